"""HTTP/2 clients at the edges of issue 14: ``Expect: 100-continue``, ``max_body``, the
graceful GOAWAY(ENHANCE_YOUR_CALM) bounded by ``calm_timeout``, and plain CONNECT (501).

Real peers on loopback: curl (``--http2-prior-knowledge``), and the small ``h2`` client of
``h2client.py`` where a test needs to hold a body back or write frames by hand.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from muxproxy.core.h2wire import ENHANCE_YOUR_CALM, PING, frame
from muxproxy.demo.h2server import OriginRequest

from .h2client import H2Client, Response
from .h2harness import curl, running_h2
from .harness import wait_for
from .origin import Script, pattern
from .test_h2_abuse import bystander

pytestmark = pytest.mark.anyio

ROUTE_LIMIT = """[[routes]]
host = "*"
path_prefix = "/"
cluster = "app"
max_body = "{limit}"
"""


# --- Expect: 100-continue ------------------------------------------------------------------


async def test_expect_100_continue_curl(tmp_path: Path) -> None:
    body = tmp_path / "body"
    body.write_bytes(pattern(100_000))
    async with running_h2(Script()) as h:
        # (without a 100, curl would wait its --expect100-timeout before sending the body)
        r = await curl(
            h, "/echo", "-v", "-H", "Expect: 100-continue", "--expect100-timeout", "60",
            "--data-binary", f"@{body}",
        )
        assert r.stdout == pattern(100_000), r.stderr[-2000:]
        assert b"< HTTP/2 100" in r.stderr


async def test_expect_100_continue_is_sent_before_any_body_and_only_once() -> None:
    async with running_h2(Script()) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            data = pattern(70_000)
            headers = [(b"expect", b"100-continue"), (b"content-length", b"70000")]
            sid = c.request("/echo", method="POST", body=data, headers=headers)
            await c.flush()  # the head only: the body waits for the 100
            r = c.responses[sid]
            with anyio.fail_after(10):
                await r.interim_seen.wait()
            await c.upload()
            with anyio.fail_after(20):
                await r.done.wait()
            assert r.interim == [100]
            assert r.status == 200 and bytes(r.body) == data
            # without Expect: no 100
            sid = c.request("/echo", method="POST", body=b"abc")
            await c.upload()
            with anyio.fail_after(20):
                await c.responses[sid].done.wait()
            assert c.responses[sid].interim == [] and c.responses[sid].status == 200
            await c.aclose()


# --- max_body --------------------------------------------------------------------------------


async def test_declared_length_over_route_max_body_is_413_before_the_backend() -> None:
    script = Script()
    async with running_h2(script, routes=ROUTE_LIMIT.format(limit="10KiB")) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            headers = [(b"expect", b"100-continue"), (b"content-length", b"20000")]
            sid = c.request("/echo", method="POST", body=pattern(20_000), headers=headers)
            await c.flush()  # never sends the body: the answer must come without it
            r = c.responses[sid]
            with anyio.fail_after(10):
                await r.done.wait()
            assert r.status == 413 and r.interim == []
            ok = c.request("/echo", method="POST", body=pattern(10_240))  # at the limit
            await c.upload()
            with anyio.fail_after(20):
                await c.responses[ok].done.wait()
            assert c.responses[ok].status == 200  # the connection lived on
            await c.aclose()
        assert len(script.request_ids) == 1  # the refused one never reached the backend


async def test_body_growing_past_max_body_is_413_and_the_backend_stream_reset() -> None:
    seen: list[OriginRequest] = []

    async def reads_first(req: OriginRequest) -> None:
        seen.append(req)
        await req.read_body()
        if req.reset_by_peer is None:
            await req.respond(200, [], b"read it all\n")

    route_limit = ROUTE_LIMIT.format(limit="100KiB")
    for limits, routes in (({}, route_limit), ({"max_body": "100KiB"}, None)):
        seen.clear()
        async with running_h2(reads_first, limits=limits, routes=routes) as h:
            c = await H2Client.connect(h.addr.host, h.addr.port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(c.run)
                sid = c.request("/up", method="POST", body=pattern(300_000))  # no length
                tg.start_soon(c.upload)  # (stops short: the stream ends under it)
                r = c.responses[sid]
                with anyio.fail_after(20):
                    await r.done.wait()
                assert r.status == 413, (limits, routes, r)
                await wait_for(lambda: bool(seen) and seen[0].reset_by_peer is not None)
                tg.cancel_scope.cancel()
            await c.aclose()


async def test_body_past_max_body_after_the_head_is_rst_stream() -> None:
    seen: list[OriginRequest] = []

    async def answers_first(req: OriginRequest) -> None:
        seen.append(req)
        await req.respond(200, [], end=False)
        await req.send_data(b"started")
        await req.read_body()

    async with running_h2(answers_first, routes=ROUTE_LIMIT.format(limit="64KiB")) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            sid = c.request("/up", method="POST", body=pattern(300_000))
            r = c.responses[sid]
            tg.start_soon(c.upload)
            with anyio.fail_after(20):
                await r.done.wait()
            assert r.status == 200 and r.reset is not None  # cut: never a clean end
            await wait_for(lambda: any(q.reset_by_peer is not None for q in seen))
            tg.cancel_scope.cancel()
        await c.aclose()


# --- GOAWAY(ENHANCE_YOUR_CALM) ----------------------------------------------------------------


async def _ping_flood(c: H2Client, n: int = 101) -> None:
    """PINGs past max_pings_per_second (100), written by hand, then nothing more."""
    await c.flush()
    await c.stream.send(frame(PING, 0, 0, b"\0" * 8) * n)


async def test_flood_goaway_lets_the_stream_in_flight_finish() -> None:
    script = Script()
    async with running_h2(script) as h, bystander(h):
        c = await H2Client.connect(h.addr.host, h.addr.port, after_goaway=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            sid = c.request("/block")
            await c.flush()
            await wait_for(lambda: len(script.started) == 1)
            await _ping_flood(c)
            await wait_for(lambda: c.goaway is not None)
            assert c.goaway is not None and c.goaway.error_code == ENHANCE_YOUR_CALM
            assert c.goaway.last_stream_id == sid
            script.release.set()
            with anyio.fail_after(10):
                await c.responses[sid].done.wait()
                await c.closed.wait()  # and then the proxy closes the connection
            r = c.responses[sid]
            assert r.status == 200 and bytes(r.body) == b"released\n" and r.reset is None
            await c.aclose()


async def test_flood_goaway_is_bounded_by_calm_timeout() -> None:
    script = Script()
    async with running_h2(script, limits={"calm_timeout": "300ms"}) as h, bystander(h):
        c = await H2Client.connect(h.addr.host, h.addr.port, after_goaway=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            sid = c.request("/stall")  # never answers
            await c.flush()
            await wait_for(lambda: len(script.started) == 1)
            await _ping_flood(c)
            with anyio.fail_after(10):
                await c.closed.wait()
            assert c.goaway is not None and c.goaway.error_code == ENHANCE_YOUR_CALM
            assert c.responses[sid].status == 0
            await wait_for(lambda: script.started[0].reset_by_peer is not None)
            await c.aclose()


# --- plain CONNECT ------------------------------------------------------------------------------


async def test_plain_connect_is_501_extended_connect_unchanged() -> None:
    async with running_h2(Script()) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"a.test:443")])
            c.responses[sid] = Response()
            bad = c.h2.get_next_available_stream_id()
            c.h2.send_headers(
                bad, [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")]
            )
            c.responses[bad] = Response()
            ok = c.request("/hello")
            await c.flush()
            with anyio.fail_after(10):
                for s in (sid, bad, ok):
                    await c.responses[s].done.wait()
            assert c.responses[sid].status == 501  # RFC 9113 §8.5, as on HTTP/1.1
            assert c.responses[bad].reset is not None and c.responses[bad].status == 0
            assert c.responses[ok].status == 200
            await c.aclose()

