"""Run an origin and the proxy in-process, on loopback, for one test."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio

from muxproxy.config import Address, loads
from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin, Handler
from muxproxy.io.server import Proxy


def config_text(backends: list[str], listener: dict[str, Any] | None = None,
                cluster: dict[str, Any] | None = None, routes: str | None = None) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return v if v.startswith("{") else f'"{v}"'  # inline tables pass through
        return str(v)

    limits = "".join(f"{k} = {fmt(v)}\n" for k, v in (listener or {}).items())
    cl = "".join(f"{k} = {fmt(v)}\n" for k, v in (cluster or {}).items())
    blist = ", ".join(f'"{b}"' for b in backends)
    routes = routes or '[[routes]]\nhost = "*"\npath_prefix = "/"\ncluster = "app"\n'
    return f"""
[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
[listeners.limits]
{limits}
[[clusters]]
name = "app"
{'' if cluster and 'protocol' in cluster else 'protocol = "h2c"'}
backends = [{blist}]
{cl}
{routes}
"""


@dataclass
class Harness:
    origin: H2Origin
    proxy: Proxy
    addr: Address
    admin: Address | None = None

    async def client(self) -> H1Client:
        return await H1Client.connect(self.addr.host, self.addr.port)

    async def get(self, target: str, **kw: Any) -> Any:
        c = await self.client()
        try:
            return await c.request("GET", target, **kw)
        finally:
            await c.aclose()

    async def raw(self, data: bytes, *, limit: float = 10) -> bytes:
        """Send raw bytes, read until the proxy closes the connection."""
        stream = await anyio.connect_tcp(self.addr.host, self.addr.port)
        out = bytearray()
        with anyio.fail_after(limit):
            await stream.send(data)
            while True:
                try:
                    out += await stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        await stream.aclose()
        return bytes(out)

    def pool(self) -> Any:
        return self.proxy.pools["app"]


@asynccontextmanager
async def running(
    handler: Handler,
    *,
    listener: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    origin: dict[str, Any] | None = None,
    backends: list[str] | None = None,
    origin_tls: ssl.SSLContext | None = None,
    routes: str | None = None,
    admin: bool = False,
) -> AsyncIterator[Harness]:
    o = H2Origin(handler, **(origin or {}))
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(o.serve, ssl_context=origin_tls))
        text = config_text(backends or [f"127.0.0.1:{port}"], listener, cluster, routes)
        if admin:
            text += '\n[admin]\nlisten = "127.0.0.1:0"\n'
        if origin_tls is not None:
            text = text.replace('protocol = "h2c"', 'protocol = "h2"')
        cfg = loads(text)
        proxy = Proxy(cfg)
        bound = await tg.start(proxy.serve)
        try:
            yield Harness(o, proxy, bound["edge"], bound.get("admin"))
        finally:
            tg.cancel_scope.cancel()


async def wait_for(predicate: Any, limit: float = 10.0) -> None:
    """Poll a condition the test cannot await directly (no fixed sleeps: bounded polling)."""
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.005)


def unacknowledged(conn: Any) -> int:
    """Connection-level bytes received from the backend and not yet handed back as credit.

    (WINDOW_UPDATEs are batched; what must reach zero is what no exchange ever consumed.)
    """
    return int(conn.core.unacknowledged())
