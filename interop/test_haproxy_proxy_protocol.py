"""A real HAProxy in TCP mode in front of a proxy_protocol listener (`send-proxy`,
`send-proxy-v2`), plain or with TLS passed through to muxproxy: the backend sees the
original client's address in X-Forwarded-For, and the access log names it as the client
(HAProxy's own address as the peer)."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import anyio
import anyio.abc
import pytest
import trustme
from anyio.streams.tls import TLSStream

from muxproxy.config import loads
from muxproxy.demo.h2server import H2Origin
from muxproxy.io.accesslog import AccessLog
from muxproxy.io.server import Proxy
from tests.integration.origin import Script

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CLIENT = "127.0.0.9"  # the original client: neither HAProxy's nor muxproxy's address
HAPROXY_SOURCE = "127.0.0.1"  # HAProxy's address towards muxproxy (in trusted_proxies)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls-passthrough"])
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_haproxy_in_front_passes_the_client_address(
    tmp_path: Path, send_proxy: str, backend: str, tls: bool
) -> None:
    ca = trustme.CA()
    tls_key = ""
    client_ctx = ssl.create_default_context()
    if tls:
        cert = ca.issue_cert("edge.example")
        pem, key = tmp_path / "edge.pem", tmp_path / "edge.key"
        cert.cert_chain_pems[0].write_to_path(str(pem))
        cert.private_key_pem.write_to_path(str(key))
        tls_key = f'tls = {{ cert = "{pem}", key = "{key}" }}\n'
        ca.configure_trust(client_ctx)

    async def scenario() -> None:
        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            proxy = Proxy(
                loads(
                    '[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\n'
                    f'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n{tls_key}'
                    f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\n'
                    'connections = 1\n[[routes]]\ncluster = "app"\n'
                )
            )
            access_log = AccessLog(str(tmp_path / "access.log"), "json")
            proxy.attach_access_log(access_log)
            edge = (await tg.start(proxy.serve))["edge"]
            front = free_port()
            cfg = tmp_path / "haproxy.cfg"
            cfg.write_text(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n"
                "  timeout server 30s\n"
                f"frontend f\n  bind 127.0.0.1:{front}\n  default_backend b\n"
                f"backend b\n  server s 127.0.0.1:{edge.port} {send_proxy}"
                f" source {HAPROXY_SOURCE}\n"
            )
            haproxy = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(cfg)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                with anyio.fail_after(15):
                    while True:  # bounded wait for HAProxy's listener
                        assert haproxy.poll() is None, haproxy.stderr
                        try:
                            probe = await anyio.connect_tcp("127.0.0.1", front)
                        except OSError:
                            await anyio.sleep(0.05)
                            continue
                        await probe.aclose()
                        break
                for _ in range(3):
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        "127.0.0.1", front, local_host=CLIENT
                    )
                    if tls:
                        stream = await TLSStream.wrap(
                            stream, hostname="edge.example", ssl_context=client_ctx
                        )
                    await stream.send(
                        b"GET /headers HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n"
                    )
                    out = bytearray()
                    with anyio.fail_after(10):
                        try:
                            while True:
                                out += await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError):
                            pass
                    await anyio.aclose_forcefully(stream)
                    assert out.startswith(b"HTTP/1.1 200"), bytes(out)
                    fields = dict(json.loads(bytes(out).split(b"\r\n\r\n", 1)[1]))
                    assert fields["x-forwarded-for"] == CLIENT
                assert proxy.proxy_header_errors == 0
            finally:
                haproxy.terminate()
                haproxy.wait(10)
            tg.cancel_scope.cancel()
        access_log.close()
        lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
        assert len(lines) == 3, lines
        for line in lines:
            assert line["client"] == CLIENT and line["peer"] == HAPROXY_SOURCE, line
            assert line["status"] == 200 and line["path"] == "/headers"

    anyio.run(scenario, backend=backend)
