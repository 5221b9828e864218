"""/metrics as a scraper sees it: every family parses with prometheus_client's parser, and
Outcome records handed to Proxy.record show up as counters and histograms."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from muxproxy.core.outcome import Outcome

from .harness import running, wait_for
from .origin import Script
from .test_admin import admin_get

pytestmark = pytest.mark.anyio


def outcome(status: int, *, cluster: str = "app", reason: str = "", total: float = 0.02) -> Outcome:
    now = time.monotonic()
    o = Outcome(time.time(), now - total, cluster=cluster, status=status, reason=reason)
    o.queue_s, o.upstream_s, o.end = 0.0001, total / 2, now
    return o


async def test_metrics_parse_and_count_outcomes() -> None:
    async with running(Script(), cluster={"connections": 1}, admin=True) as h:
        assert h.admin is not None
        await wait_for(lambda: h.pool().statistics().connections == 1)
        client = await h.client()  # one open client connection for the gauge
        await wait_for(lambda: len(h.proxy.clients) == 1)
        for status in (200, 200, 201, 404, 502):
            h.proxy.record(outcome(status))
        h.proxy.record(outcome(400, cluster="", reason="refused_malformed"))
        h.proxy.record(outcome(503, reason="pending_timeout", total=5.0))
        status, body = await admin_get(h.admin, "/metrics")
        assert status == 200
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}

        def value(family: str, sample: str, **labels: str) -> float:
            for s in fams[family].samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
            raise AssertionError(f"no {sample} {labels}")

        assert fams["muxproxy_requests"].type == "counter"
        assert value("muxproxy_requests", "muxproxy_requests_total", cluster="app", code="2xx") == 3
        assert value("muxproxy_requests", "muxproxy_requests_total", cluster="app", code="5xx") == 2
        assert value("muxproxy_requests", "muxproxy_requests_total", cluster="", code="4xx") == 1
        refused = "muxproxy_requests_refused_total"
        assert value("muxproxy_requests_refused", refused, reason="pending_timeout") == 1
        assert value("muxproxy_requests_refused", refused, reason="refused_malformed") == 1
        dur = "muxproxy_request_duration_seconds"
        assert fams[dur].type == "histogram"
        assert value(dur, f"{dur}_count", cluster="app") == 6
        assert value(dur, f"{dur}_bucket", cluster="app", le="0.025") == 5
        assert value(dur, f"{dur}_bucket", cluster="app", le="+Inf") == 6
        up = "muxproxy_upstream_seconds"
        assert value(up, f"{up}_count", cluster="app") == 6
        q = "muxproxy_request_queue_seconds"
        assert value(q, f"{q}_bucket", cluster="app", le="0.001") == 6
        assert value("muxproxy_client_connections", "muxproxy_client_connections") == 1
        healthy = "muxproxy_backend_healthy"
        assert value(healthy, healthy, cluster="app") == 1
        conns = "muxproxy_backend_connections"
        assert value(conns, conns, cluster="app") == 1  # the port budget, per backend
        await client.aclose()


async def test_real_requests_reach_the_counters() -> None:
    """End to end: requests through the proxy (not hand-made records) are counted by cluster
    and status class, refused ones by reason, and timed in the histograms."""
    async with running(Script(), admin=True) as h:
        assert h.admin is not None
        c = await h.client()
        for target in ("/hello", "/hello", "/status/503"):
            await c.request("GET", target)
        await c.aclose()
        raw = await h.raw(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400")

        async def scrape() -> dict[str, object]:
            _, body = await admin_get(h.admin, "/metrics")  # type: ignore[arg-type]
            return {f.name: f for f in text_string_to_metric_families(body.decode())}

        def value(fams: dict[str, object], family: str, sample: str, **labels: str) -> float:
            for s in fams[family].samples:  # type: ignore[attr-defined]
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
            return 0.0

        fams = await scrape()
        total = "muxproxy_requests_total"
        assert value(fams, "muxproxy_requests", total, cluster="app", code="2xx") == 2
        assert value(fams, "muxproxy_requests", total, cluster="app", code="5xx") == 1
        refused = "muxproxy_requests_refused_total"
        assert value(fams, "muxproxy_requests_refused", refused, reason="refused_malformed") == 1
        dur = "muxproxy_request_duration_seconds"
        assert value(fams, dur, f"{dur}_count", cluster="app") == 3
        up = "muxproxy_upstream_seconds"
        assert value(fams, up, f"{up}_count", cluster="app") == 3
