"""Request metrics fed by :class:`~muxproxy.core.outcome.Outcome` records: counters that alert.

Theory of operation: the proxy calls :meth:`Metrics.observe` once per finished request or
tunnel (through ``Proxy.record``).  An observation is a handful of list-element increments:
per cluster, a row of request counters indexed by status class (``status // 100``; 0 means no
response was sent) and three histograms (total duration, queue wait, upstream time to the
response head), each a flat list of per-bucket counts found with :func:`bisect.bisect_left`
over fixed bounds.  No lock (one event loop per process), no object per observation beyond
what the first request of a new cluster or reason creates.  :meth:`Metrics.render` writes
the Prometheus text families (buckets made cumulative there, at scrape time).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from .outcome import Outcome

__all__ = ["DURATION_BUCKETS", "NOT_REFUSED", "Histogram", "Metrics"]

# Seconds; the usual latency ladder from 1 ms to a minute (+Inf is implied).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Reasons that are not the proxy refusing or failing the request.
NOT_REFUSED = frozenset({"", "tunnel_closed", "client_gone"})
_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


class Histogram:
    """Counts per bucket (not cumulative), the sum and the count of observations."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for n in self.counts:
            total += n
            out.append(total)
        return out


class _Cluster:
    __slots__ = ("duration", "queue", "requests", "upstream")

    def __init__(self) -> None:
        self.requests = [0] * len(_CLASSES)
        self.duration = Histogram()
        self.queue = Histogram()
        self.upstream = Histogram()


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Aggregates of every observed Outcome, by cluster ("" for requests refused before
    routing) and, for refusals, by reason."""

    def __init__(self) -> None:
        self.clusters: dict[str, _Cluster] = {}
        self.refused: dict[str, int] = {}  # reason → count

    def observe(self, o: Outcome) -> None:
        c = self.clusters.get(o.cluster)
        if c is None:
            c = self.clusters[o.cluster] = _Cluster()
        status = o.status
        c.requests[status // 100 if 100 <= status < 600 else 0] += 1
        # (Histogram.observe, inlined: three calls fewer on every request)
        for h, v in (
            (c.duration, o.end - o.start if o.end >= 0 else -1.0),
            (c.queue, o.queue_s),
            (c.upstream, o.upstream_s),
        ):
            if v >= 0:
                h.counts[bisect_left(DURATION_BUCKETS, v)] += 1
                h.sum += v
        reason = o.reason
        if reason not in NOT_REFUSED:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def render(self, family: Callable[[str, str, str, list[str]], None]) -> None:
        """Emit each family as ``family(name, type, help, sample_lines)``."""
        items = sorted(self.clusters.items())
        family(
            "muxproxy_requests_total",
            "counter",
            "Requests and tunnels finished, by cluster and status class (0xx: no response).",
            [
                f'muxproxy_requests_total{{cluster="{_label(name)}",code="{cls}"}} {n}'
                for name, c in items
                for cls, n in zip(_CLASSES, c.requests, strict=True)
                if n
            ],
        )
        for attr, name, help_ in (
            ("duration", "muxproxy_request_duration_seconds", "Request or tunnel, head to end."),
            ("queue", "muxproxy_request_queue_seconds", "Wait for a backend stream."),
            ("upstream", "muxproxy_upstream_seconds", "Request sent → response head."),
        ):
            lines: list[str] = []
            for cluster, c in items:
                h: Histogram = getattr(c, attr)
                cum = h.cumulative()
                lab = f'cluster="{_label(cluster)}"'
                for bound, n in zip((*DURATION_BUCKETS, "+Inf"), cum, strict=True):
                    lines.append(f'{name}_bucket{{{lab},le="{bound}"}} {n}')
                lines.append(f"{name}_sum{{{lab}}} {h.sum}")
                lines.append(f"{name}_count{{{lab}}} {cum[-1]}")
            family(name, "histogram", help_, lines)
        family(
            "muxproxy_requests_refused_total",
            "counter",
            "Requests the proxy refused or failed itself, by reason code (core/outcome.py).",
            [
                f'muxproxy_requests_refused_total{{reason="{_label(r)}"}} {n}'
                for r, n in sorted(self.refused.items())
            ],
        )
