"""HTTP/2 clients (issue 14): curl and nghttp through muxproxy, TLS ALPN h2 and h2c."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest

from .h2client import H2Client
from .h2harness import curl, running_h2
from .origin import Script, pattern

pytestmark = pytest.mark.anyio


async def test_curl_h2c_prior_knowledge() -> None:
    async with running_h2(Script()) as h:
        r = await curl(h, "/hello", "-w", "%{http_version} %{http_code}", "-o", "/dev/null")
        assert r.stdout == b"2 200", r.stderr
        r = await curl(h, "/big?300000")
        assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(pattern(300000)).digest()


async def test_curl_h2_over_tls_alpn(tmp_path: Path) -> None:
    async with running_h2(Script(), tls_dir=tmp_path) as h:
        r = await curl(h, "/hello", "-w", " %{http_version}")
        assert r.stdout == b"hello\n 2", r.stderr
        body = tmp_path / "body"
        body.write_bytes(pattern(200_000))
        r = await curl(h, "/echo", "--data-binary", f"@{body}")
        assert r.stdout == pattern(200_000), r.stderr


async def test_nghttp_100_concurrent_streams_one_connection() -> None:
    async with running_h2(Script(), cluster={"connections": 2}) as h:
        r = await anyio.run_process(
            ["nghttp", "-n", "-s", "-m", "100", "-t", "20", f"{h.url}/big?100000"], check=False
        )
        lines = [ln.split() for ln in r.stdout.decode().splitlines()]
        codes = [ln[-3] for ln in lines if len(ln) >= 6 and ln[-1].startswith("/big")]
        assert codes == ["200"] * 100, r.stdout.decode()[-2000:] + r.stderr.decode()
        assert h.origin is not None and h.origin.connections_accepted <= 2


async def test_100_streams_bodies_intact_sha256() -> None:
    sizes = [1000 + 7919 * i for i in range(99)]  # + one upload: max_concurrent_streams
    async with running_h2(Script(), cluster={"connections": 2}) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            sids = {c.request(f"/big?{n}"): n for n in sizes}
            sids[c.request("/echo", method="POST", body=pattern(300_000))] = 300_000
            await c.upload()
            with anyio.fail_after(30):
                for sid in sids:
                    await c.responses[sid].done.wait()
            for sid, n in sids.items():
                r = c.responses[sid]
                assert r.status == 200 and r.reset is None
                assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(pattern(n)).hexdigest()
            await c.aclose()
        assert h.origin is not None and h.origin.connections_accepted <= 2
