"""core/metrics: Outcome records become counters and histograms a scraper can parse."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from muxproxy.core.metrics import Metrics
from muxproxy.core.outcome import Outcome


def outcome(cluster: str, status: int, total: float, **kw: object) -> Outcome:
    o = Outcome(wall_start=0.0, start=100.0, cluster=cluster, status=status, **kw)  # type: ignore[arg-type]
    o.end = 100.0 + total
    return o


def render(m: Metrics) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

    m.render(family)
    return "\n".join(lines) + "\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_by_cluster_and_status_class() -> None:
    m = Metrics()
    for status in (200, 204, 404, 502, 503):
        m.observe(outcome("app", status, 0.01))
    m.observe(outcome("api", 200, 0.01))
    m.observe(outcome("", 400, 0.0, reason="refused_malformed"))  # refused before routing
    m.observe(outcome("app", 0, 0.5, reason="client_gone"))  # nothing was sent
    s = samples(render(m))
    assert s[("muxproxy_requests_total", (("cluster", "app"), ("code", "2xx")))] == 2
    assert s[("muxproxy_requests_total", (("cluster", "app"), ("code", "4xx")))] == 1
    assert s[("muxproxy_requests_total", (("cluster", "app"), ("code", "5xx")))] == 2
    assert s[("muxproxy_requests_total", (("cluster", "app"), ("code", "0xx")))] == 1
    assert s[("muxproxy_requests_total", (("cluster", "api"), ("code", "2xx")))] == 1
    assert s[("muxproxy_requests_total", (("cluster", ""), ("code", "4xx")))] == 1
    refused = {k[1]: v for k, v in s.items() if k[0] == "muxproxy_requests_refused_total"}
    assert refused == {(("reason", "refused_malformed"),): 1}  # client_gone is not a refusal


def test_histograms_count_each_phase_that_happened() -> None:
    m = Metrics()
    m.observe(outcome("app", 200, 0.003, queue_s=0.0004, upstream_s=0.002))
    m.observe(outcome("app", 200, 2.0, upstream_s=1.5))  # no queue wait
    m.observe(outcome("app", 503, 5.0, queue_s=5.0, reason="pending_timeout"))  # no upstream
    s = samples(render(m))
    app = ("cluster", "app")

    def bucket(name: str, le: str) -> float:
        return s[(f"{name}_bucket", (app, ("le", le)))]

    assert s[("muxproxy_request_duration_seconds_count", (app,))] == 3
    assert bucket("muxproxy_request_duration_seconds", "0.005") == 1
    assert bucket("muxproxy_request_duration_seconds", "2.5") == 2
    assert bucket("muxproxy_request_duration_seconds", "+Inf") == 3
    assert s[("muxproxy_request_queue_seconds_count", (app,))] == 2
    assert bucket("muxproxy_request_queue_seconds", "0.001") == 1
    assert s[("muxproxy_upstream_seconds_count", (app,))] == 2
    assert s[("muxproxy_upstream_seconds_sum", (app,))] == 1.502
    assert bucket("muxproxy_upstream_seconds", "1.0") == 1


def test_an_unfinished_outcome_is_counted_without_a_duration() -> None:
    m = Metrics()
    m.observe(Outcome(wall_start=0.0, start=1.0, cluster="app", status=200))
    s = samples(render(m))
    assert s[("muxproxy_requests_total", (("cluster", "app"), ("code", "2xx")))] == 1
    assert s[("muxproxy_request_duration_seconds_count", (("cluster", "app"),))] == 0
