"""The admin listener: ``/healthz``, ``/pools`` (JSON) and ``/metrics`` (Prometheus text).

Multiplexing is the point of muxproxy, so its metrics say how the pools are doing: usable,
draining and connecting connections per backend, open streams against each connection's
SETTINGS limit, the pending queue, GOAWAYs, REFUSED_STREAMs, replays, resets, PING timeouts,
reconnects and ejections.  Low traffic by nature: one h11 connection at a time per client,
``Connection: close`` after each answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import anyio
import anyio.abc
import h11

from ..core.metrics import Metrics
from .backend import NETWORK_ERRORS
from .pool import PoolStatistics


@dataclass(slots=True)
class ProxyStatistics:
    """A snapshot of the whole proxy, as ``Proxy.statistics()`` returns it."""

    draining: bool
    client_connections: int
    refused_connections: int
    pools: dict[str, PoolStatistics]
    proxy_header_errors: int = 0
    internal_errors: int = 0  # connections and streams a bug of ours ended
    metrics: Metrics | None = None  # request counters and histograms (rendered as they are)
    # Reload and access-log figures (Proxy.reload_statistics): generation, reloads, ...
    reload: dict[str, int] = field(default_factory=dict)


Statistics = Callable[[], ProxyStatistics]


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(snapshot: ProxyStatistics) -> str:
    """Prometheus text exposition (version 0.0.4) of the proxy's state."""
    lines: list[str] = []

    def family(name: str, kind: str, help_: str, samples: Iterator[tuple[str, object]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    stats = snapshot.pools
    family(
        "muxproxy_client_connections",
        "gauge",
        "Client connections open now.",
        iter([("", snapshot.client_connections)]),
    )
    family(
        "muxproxy_client_connections_refused_total",
        "counter",
        "Client connections closed at once because a listener was at max_connections.",
        iter([("", snapshot.refused_connections)]),
    )
    family(
        "muxproxy_proxy_protocol_errors_total",
        "counter",
        "Connections closed for want of a valid PROXY header from a trusted peer.",
        iter([("", snapshot.proxy_header_errors)]),
    )

    family(
        "muxproxy_internal_errors_total",
        "counter",
        "Client connections or HTTP/2 streams ended by an internal error (a bug: logged "
        "with its traceback at debug level); each cost only itself.",
        iter([("", snapshot.internal_errors)]),
    )

    def raw_family(name: str, kind: str, help_: str, samples: list[str]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)

    if snapshot.metrics is not None:
        snapshot.metrics.render(raw_family)

    def per_backend(attr: str) -> Iterator[tuple[str, object]]:
        for s in stats.values():
            for b in s.backends:
                yield (
                    f'{{cluster="{_label(s.cluster)}",backend="{_label(b.address)}"}}',
                    (int(getattr(b, attr))),
                )

    def per_connection(attr: str) -> Iterator[tuple[str, object]]:
        for s in stats.values():
            for b in s.backends:
                for c in b.connections:
                    labels = (
                        f'{{cluster="{_label(s.cluster)}",backend="{_label(b.address)}",'
                        f'connection="{c.id}",draining="{str(c.draining).lower()}"}}'
                    )
                    yield labels, int(getattr(c, attr))

    family(
        "muxproxy_backend_healthy",
        "gauge",
        "1 if the backend takes new streams.",
        per_backend("healthy"),
    )
    family(
        "muxproxy_backend_connections",
        "gauge",
        "TCP (h2) or QUIC (h3) connections open to the backend from this worker, draining "
        "ones included: the source ports it holds towards that address.",
        per_backend("open_connections"),
    )
    family(
        "muxproxy_backend_connecting",
        "gauge",
        "Connection slots being (re)connected.",
        per_backend("connecting"),
    )
    family(
        "muxproxy_backend_reconnects_total",
        "counter",
        "Connections opened to replace one.",
        per_backend("reconnects"),
    )
    family(
        "muxproxy_backend_resets_received_total",
        "counter",
        "RST_STREAM from the backend.",
        per_backend("resets_received"),
    )
    family(
        "muxproxy_backend_refused_streams_total",
        "counter",
        "RST_STREAM(REFUSED_STREAM) from the backend.",
        per_backend("refused_received"),
    )
    family(
        "muxproxy_backend_ping_timeouts_total",
        "counter",
        "Connections declared dead for want of a PING ACK.",
        per_backend("ping_timeouts"),
    )
    family(
        "muxproxy_connection_streams_open",
        "gauge",
        "Streams open on a pooled connection.",
        per_connection("streams_open"),
    )
    family(
        "muxproxy_connection_max_concurrent_streams",
        "gauge",
        "The stream limit of a pooled connection (backend SETTINGS, capped by config).",
        per_connection("max_concurrent_streams"),
    )
    family(
        "muxproxy_connection_streams_total",
        "counter",
        "Streams opened on a connection.",
        per_connection("streams_opened"),
    )
    family(
        "muxproxy_pool_pending",
        "gauge",
        "Requests waiting for a free stream.",
        iter((f'{{cluster="{_label(s.cluster)}"}}', s.pending) for s in stats.values()),
    )
    family(
        "muxproxy_pool_events_total",
        "counter",
        "Pool events: connections_opened, goaway_received, replays, queued, pending_timeout,"
        " pending_overflow, connect_failures, ejections, grown, websockets, ...",
        iter(
            (f'{{cluster="{_label(s.cluster)}",event="{_label(k)}"}}', v)
            for s in stats.values()
            for k, v in sorted(s.counters.items())
        ),
    )
    # Reload and access log (helper "reloadlog"): Proxy.reload_statistics().
    for key, value in snapshot.reload.items():
        gauge = key in ("config_generation", "access_log_queued")
        name = f"muxproxy_{key}" if gauge else f"muxproxy_{key}_total"
        family(
            name, "gauge" if gauge else "counter", key.replace("_", " ") + ".", iter([("", value)])
        )
    return "\n".join(lines) + "\n"


async def serve_admin(statistics: Statistics, stream: anyio.abc.ByteStream) -> None:
    """Answer one request on an admin connection, then close it."""
    conn = h11.Connection(h11.SERVER)
    try:
        with anyio.fail_after(10):
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive())
                    continue
                break
            if not isinstance(ev, h11.Request):
                return
            status, ctype, body = _route(statistics, ev.method, ev.target)
            headers = [
                ("content-type", ctype),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            out = conn.send(h11.Response(status_code=status, headers=headers))
            if ev.method != b"HEAD":
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send(out)
    except (TimeoutError, h11.RemoteProtocolError, *NETWORK_ERRORS):
        pass
    finally:
        await stream.aclose()


def _route(statistics: Statistics, method: bytes, target: bytes) -> tuple[int, str, bytes]:
    if method not in (b"GET", b"HEAD"):
        return 405, "text/plain", b"GET only\n"
    path = target.split(b"?", 1)[0]
    snapshot = statistics()
    if path == b"/healthz":
        if snapshot.draining:
            return 503, "text/plain", b"draining\n"
        return 200, "text/plain", b"ok\n"
    if path == b"/pools":
        pools = {name: dataclasses.asdict(s) for name, s in snapshot.pools.items()}
        return 200, "application/json", json.dumps(pools, indent=2).encode()
    if path == b"/metrics":
        return 200, "text/plain; version=0.0.4", metrics_text(snapshot).encode()
    return 404, "text/plain", b"try /healthz, /pools or /metrics\n"
