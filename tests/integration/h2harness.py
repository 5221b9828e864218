"""The proxy with HTTP/2 clients: a listener speaking h2 (TLS/ALPN or h2c prior knowledge)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import trustme

from muxproxy.config import Address, loads
from muxproxy.demo.h2server import H2Origin, Handler
from muxproxy.io.server import Proxy

from .harness import config_text


@dataclass
class H2Harness:
    origin: H2Origin | None
    proxy: Proxy
    addr: Address
    ca_file: Path | None

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://localhost:{self.addr.port}"


def make_tls(tmp: Path) -> tuple[str, Path]:
    """A trustme CA and a server certificate for localhost (made at test time)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    tls = f'{{ cert = "{tmp / "server.pem"}", key = "{tmp / "server.pem"}" }}'
    return tls, tmp / "ca.pem"


@asynccontextmanager
async def running_h2(
    handler: Handler | None,
    *,
    protocols: Sequence[str] | None = ("h2", "http1"),
    tls_dir: Path | None = None,
    limits: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    backends: list[str] | None = None,
    routes: str | None = None,
    origin_options: dict[str, Any] | None = None,
) -> AsyncIterator[H2Harness]:
    async with anyio.create_task_group() as tg:
        origin = None
        if handler is not None:
            origin = H2Origin(handler, **(origin_options or {}))
            port = await tg.start(partial(origin.serve, ssl_context=None))
            backends = [f"127.0.0.1:{port}"]
        assert backends
        text = config_text(backends, limits, cluster, routes)
        extra = ""
        if protocols is not None:
            extra += "protocols = [" + ", ".join(f'"{p}"' for p in protocols) + "]\n"
        ca_file = None
        if tls_dir is not None:
            tls, ca_file = make_tls(tls_dir)
            extra += f"tls = {tls}\n"
        text = text.replace('listen = "127.0.0.1:0"\n', 'listen = "127.0.0.1:0"\n' + extra, 1)
        proxy = Proxy(loads(text))
        bound = await tg.start(proxy.serve)
        try:
            yield H2Harness(origin, proxy, bound["edge"], ca_file)
        finally:
            tg.cancel_scope.cancel()


def client_context(ca_file: Path, alpn: Sequence[str] = ("h2",)) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.set_alpn_protocols(list(alpn))
    return ctx


async def curl(h: H2Harness, path: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """curl over HTTP/2: TLS with ALPN h2, or h2c with prior knowledge."""
    mode = ["--http2", "--cacert", str(h.ca_file)] if h.ca_file else ["--http2-prior-knowledge"]
    cmd = ["curl", "-sS", "--max-time", "20", *mode, *args, h.url + path]
    return await anyio.run_process(cmd, check=False)
