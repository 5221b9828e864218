"""The connection budget of a config: what `muxproxy check` prints about backend connections.

A proxy that opens a backend connection per client needs one source port per client towards
each backend ``ip:port`` (about 28,000 with Linux's default ``ip_local_port_range``).  muxproxy
needs ``workers × connections`` per backend address, whatever the number of clients, growing
to ``workers × max_connections`` only while every connection is at the backend's stream
limit.  This module does that arithmetic for each cluster, so an operator sees the number
before the first client arrives.
"""

from __future__ import annotations

from .config import ClusterConfig, Config
from .io.discovery import is_name

__all__ = ["connection_budget"]


def _cluster(c: ClusterConfig, workers: int) -> tuple[str, int, int]:
    literal = [a for a in c.backends if not is_name(a.host)]
    names = [a for a in c.backends if is_name(a.host)]
    per_address = workers * c.connections
    ceiling_per_address = workers * c.connection_cap
    total = per_address * len(literal)
    ceiling = ceiling_per_address * len(literal)
    parts = [f"{workers} worker(s) × {c.connections} connection(s) = {per_address} per backend"]
    if c.max_connections is not None:
        parts.append(f"up to {ceiling_per_address} with max_connections = {c.max_connections}")
    line = f"cluster {c.name}: " + ", ".join(parts)
    if literal:
        line += f"; × {len(literal)} address(es) = {total}"
        if c.max_connections is not None:
            line += f" (ceiling {ceiling})"
    if names:
        hosts = ", ".join(a.host for a in names)
        line += f"; + {per_address} per address that {hosts} resolve(s) to"
    streams = per_address * c.max_streams_per_connection
    line += (
        f"; ≤ {streams:,} concurrent streams per backend (max_streams_per_connection "
        f"{c.max_streams_per_connection}; the backend's SETTINGS may lower it, see /pools)"
    )
    return line, total, ceiling


def connection_budget(cfg: Config) -> list[str]:
    """Lines describing the backend connections this config opens, per instance."""
    workers = cfg.proxy.workers
    lines = []
    total = ceiling = 0
    for c in cfg.clusters:
        line, t, m = _cluster(c, workers)
        lines.append("budget: " + line)
        total += t
        ceiling += m
    named = any(is_name(a.host) for c in cfg.clusters for a in c.backends)
    summary = f"budget: {total} backend connection(s) per instance"
    if ceiling > total:
        summary += f", at most {ceiling}"
    if named:
        summary += " to literal addresses, plus those per resolved address"
    lines.append(summary + " (instances × workers × connections in all)")
    return lines
