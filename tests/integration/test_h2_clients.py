"""HTTP/2 clients (issue 14): curl and nghttp through muxproxy, TLS ALPN h2 and h2c."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from muxproxy.core.outcome import Outcome

from .h2client import H2Client, Response
from .h2harness import H2Harness, curl, running_h2
from .harness import wait_for
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


async def _one(h: H2Harness, *reqs: tuple[str, dict[str, Any]]) -> list[Response]:
    c = await H2Client.connect(h.addr.host, h.addr.port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(c.run)
        sids = [c.request(path, **kw) for path, kw in reqs]
        await c.upload()
        with anyio.fail_after(20):
            for sid in sids:
                await c.responses[sid].done.wait()
        await c.aclose()
    return [c.responses[s] for s in sids]


async def test_errors_resets_and_trailers_per_stream() -> None:
    async with running_h2(Script()) as h:
        reset, mid, trailers, nolen, hdrs, ok = await _one(
            h,
            ("/reset", {}),
            ("/die-mid-body", {}),
            ("/trailers", {}),
            ("/nolength", {}),
            ("/headers", {"headers": [(b"te", b"trailers"), (b"x-a", b"1")]}),
            ("/hello", {}),
        )
        # A backend reset before the head: 502 on that stream only.
        assert reset.status == 502 and b"backend" in reset.body
        # A backend reset mid-body: the client's stream is reset, never ended cleanly.
        assert mid.status == 200 and mid.reset is not None
        assert trailers.status == 200 and bytes(trailers.body) == b"body"
        assert trailers.trailers == [(b"x-checksum", b"abc")]
        assert bytes(nolen.body) == b"part one, part two" and nolen.reset is None
        seen = dict((k.encode(), v.encode()) for k, v in json.loads(bytes(hdrs.body)))
        assert seen[b"te"] == b"trailers" and seen[b"x-a"] == b"1"
        assert seen[b"via"].startswith(b"2 ")
        assert seen[b":authority"] == b"localhost"
        assert ok.status == 200 and bytes(ok.body) == b"hello\n"  # the connection lived on


async def test_malformed_request_is_a_stream_error_and_404() -> None:
    routes = '[[routes]]\nhost = "app.test"\npath_prefix = "/"\ncluster = "app"\n'
    async with running_h2(Script(), routes=routes) as h:
        bad, nf, ok = await _one(
            h,
            ("/hello", {"authority": "app.test", "headers": [(b"connection", b"close")]}),
            ("/hello", {"authority": "other.test"}),
            ("/hello", {"authority": "app.test"}),
        )
        assert bad.reset is not None and bad.status == 0  # RFC 9113 §8.2.2
        assert nf.status == 404
        assert ok.status == 200


async def test_drain_goaway_lets_in_flight_streams_finish() -> None:
    script = Script()
    async with running_h2(script) as h:
        cmd = ["nghttp", "-v", "-t", "20", f"{h.url}/block"]
        async with await anyio.open_process(cmd) as proc:
            await wait_for(lambda: len(script.started) == 1)
            h.proxy.shutdown()
            assert proc.stdout is not None
            out = b""
            with anyio.fail_after(10):
                while b"recv GOAWAY" not in out:
                    out += await proc.stdout.receive()
                script.release.set()
                async for chunk in proc.stdout:
                    out += chunk
                await proc.wait()
        text = out.decode()
        # (nghttp's request is stream 13, after its PRIORITY-only streams)
        assert "recv GOAWAY" in text and "last_stream_id=13, error_code=NO_ERROR" in text
        assert "released" in text and ":status: 200" in text
        assert proc.returncode == 0


async def test_http1_still_served_beside_h2_and_upgrade_h2c_refused(tmp_path: Path) -> None:
    async with running_h2(Script()) as h:  # plain, ["h2", "http1"]: told apart by the preface
        r = await anyio.run_process(
            ["curl", "-sS", "--http1.1", "-w", " %{http_version}", f"{h.url}/hello"], check=False
        )
        assert r.stdout == b"hello\n 1.1", r.stderr
        # curl --http2 on a plain URL asks for Upgrade: h2c; it stays HTTP/1.1.
        r = await anyio.run_process(
            ["curl", "-sS", "--http2", "-w", " %{http_version}", f"{h.url}/hello"], check=False
        )
        assert r.stdout == b"hello\n 1.1", r.stderr
    async with running_h2(Script(), tls_dir=tmp_path) as h:
        r = await curl(h, "/hello", "--http1.1", "-w", " %{http_version}")
        assert r.stdout == b"hello\n 1.1", r.stderr
    async with running_h2(Script(), protocols=None) as h:  # plain default: HTTP/1.1 only
        r = await curl(h, "/hello")
        assert r.returncode != 0


async def test_outcomes_recorded_once_per_stream_refusals_included() -> None:
    routes = '[[routes]]\nhost = "app.test"\npath_prefix = "/"\ncluster = "app"\n'
    async with running_h2(Script(), routes=routes) as h:
        seen: list[Outcome] = []
        h.proxy.recorders.append(seen.append)
        await _one(
            h,
            ("/hello", {"authority": "app.test"}),
            ("/hello", {"authority": "app.test", "headers": [(b"connection", b"close")]}),
            ("/nope", {"authority": "other.test"}),
        )
        await wait_for(lambda: len(seen) == 3)
        by = sorted((o.status, o.reason, o.protocol) for o in seen)
        assert by == [(0, "refused_malformed", "HTTP/2"), (200, "", "HTTP/2"),
                      (404, "no_route", "HTTP/2")]
        ok = next(o for o in seen if o.status == 200)
        assert (ok.method, ok.authority, ok.path) == ("GET", "app.test", "/hello")
        assert ok.cluster == "app"
        assert ok.bytes_out == 6 and ok.backend_conn > 0 and ok.end >= ok.start
