"""Sentences of issue 14 that no other test held the proxy to: HTTP/2 clients on an http1
cluster, forwarded headers, replays, per-stream flow control both ways."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import h2.settings
import pytest

from muxproxy.demo.h2server import OriginRequest
from muxproxy.io.client_h2 import WRITE_BEHIND, H2ClientConnection

from .h2client import H2Client
from .h2harness import curl, running_h2
from .harness import wait_for
from .origin import Script, pattern
from .test_http1_backend import H1Origin

pytestmark = pytest.mark.anyio


async def test_h2_client_streams_on_an_http1_cluster() -> None:
    """"Each client stream becomes one stream on the backend pool (h2c, h2, h3, http1 clusters
    alike)"."""
    origin = H1Origin()
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        cluster = {"protocol": "http1", "connections": 2}
        async with running_h2(None, backends=[f"127.0.0.1:{port}"], cluster=cluster) as h:
            c = await H2Client.connect(h.addr.host, h.addr.port)
            async with anyio.create_task_group() as ctg:
                ctg.start_soon(c.run)
                sids = [c.request(f"/x{i}") for i in range(20)]
                await c.flush()
                with anyio.fail_after(20):
                    for sid in sids:
                        await c.responses[sid].done.wait()
                ctg.cancel_scope.cancel()
            await c.aclose()
            assert all(c.responses[s].status == 200 for s in sids)
            assert all(bytes(c.responses[s].body) == b"ok\n" for s in sids)
            assert origin.requests == 20
        tg.cancel_scope.cancel()


async def test_forwarded_headers_and_replays_as_for_http1() -> None:
    """"...through the same routes, header rules (`:authority`, `:scheme`, forwarded headers
    ...), queue, limits, replay rules and error statuses as an HTTP/1.1 request"."""
    script = Script()
    async with running_h2(script) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            hdrs = c.request("/headers", headers=[(b"x-forwarded-for", b"6.6.6.6")])
            replayed = c.request("/goaway-after-body", method="POST", body=b"twice")
            await c.upload()
            with anyio.fail_after(20):
                for sid in (hdrs, replayed):
                    await c.responses[sid].done.wait()
            tg.cancel_scope.cancel()
        await c.aclose()
        seen = dict(json.loads(bytes(c.responses[hdrs].body)))
        assert seen["x-forwarded-for"] == "127.0.0.1"  # an untrusted peer's value is replaced
        assert seen["x-forwarded-proto"] == "http"
        assert seen[":scheme"] == "http"
        r = c.responses[replayed]
        assert r.status == 200 and bytes(r.body) == b"twice"  # the backend disowned it once
        assert script.goaways_sent == 1


async def test_an_unread_stream_stalls_neither_its_siblings_nor_other_clients() -> None:
    """"a client that stops reading one response holds at most its stream window in the proxy
    and stalls neither its own other streams nor other clients"."""
    async with running_h2(Script(), cluster={"stream_window": "64KiB"}) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        other = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            tg.start_soon(other.run)
            stuck = c.request("/big?2000000")
            c.hold.add(stuck)  # its stream window never opens again
            await c.flush()
            await wait_for(lambda: len(c.responses[stuck].body) == 65535)
            siblings = [c.request("/big?300000") for _ in range(3)]
            await c.flush()
            elsewhere = other.request("/big?300000")
            await other.flush()
            with anyio.fail_after(20):
                for sid in siblings:
                    await c.responses[sid].done.wait()
                await other.responses[elsewhere].done.wait()
            for r in [*(c.responses[s] for s in siblings), other.responses[elsewhere]]:
                assert r.status == 200 and bytes(r.body) == pattern(300_000)
            assert not c.responses[stuck].done.is_set()
            assert len(c.responses[stuck].body) == 65535
            pool = h.proxy.pools["app"]
            held = sum(int(conn.core.unacknowledged()) for b in pool.backends for conn in b.conns)
            assert held <= 64 * 1024  # the stuck stream's backend window, no more
            tg.cancel_scope.cancel()
        await c.aclose()
        await other.aclose()


async def test_an_upload_moves_at_the_backend_pace() -> None:
    """"request bodies are read as the backend stream's window opens"."""
    started: list[OriginRequest] = []
    gate = anyio.Event()

    async def slow_reader(req: OriginRequest) -> None:
        started.append(req)
        await gate.wait()
        body = await req.read_body()
        await req.respond(200, [], str(len(body)).encode())

    async with running_h2(slow_reader) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            data = pattern(2_000_000)
            sid = c.request("/up", method="POST", body=data)
            tg.start_soon(c.upload)
            # blocked: the backend reads nothing, so the proxy opens no more window
            await wait_for(lambda: bool(started) and c.h2.local_flow_control_window(sid) == 0)
            sent = len(data) - len(c.pending.get(sid, b""))
            # the proxy's stream window (initial_window) + the backend's stream window
            assert sent <= 2 * 65535, sent
            gate.set()
            with anyio.fail_after(30):
                await c.responses[sid].done.wait()
            assert c.responses[sid].status == 200 and bytes(c.responses[sid].body) == b"2000000"
            tg.cancel_scope.cancel()
        await c.aclose()


async def test_alpn_order_is_the_listeners_and_connect_protocol_only_with_websockets(
    tmp_path: Path,
) -> None:
    """"on a TLS listener, the ALPN list offered, in that order"; "we announce
    SETTINGS_ENABLE_CONNECT_PROTOCOL on listeners whose routes allow WebSockets"."""
    async with running_h2(Script(), protocols=("http1", "h2"), tls_dir=tmp_path) as h:
        r = await curl(h, "/hello", "-w", " %{http_version}")  # curl offers h2 first
        assert r.stdout == b"hello\n 1.1", r.stderr
    async with running_h2(Script(), protocols=("h2",)) as h:  # the default route: no WebSockets
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            await c.flush()
            with anyio.fail_after(10):
                await c.remote_settings.wait()
            settings = c.h2.remote_settings
            assert settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 0
            tg.cancel_scope.cancel()
        await c.aclose()


async def test_a_response_without_trailers_ends_on_its_last_data() -> None:
    """"a response without trailers is ended with END_STREAM on the last DATA" (nghttp -v):
    when the backend ends its stream on its last DATA, so does the proxy.  (A backend that
    ends with an empty DATA frame gets the same from the proxy: holding every DATA back until
    the next frame says whether it was the last would cost latency.)"""

    async def chunks(req: OriginRequest) -> None:
        await req.respond(200, [], end=False)
        await req.send_data(pattern(20_000))
        await req.send_data(pattern(20_000), end=True)

    async with running_h2(chunks) as h:
        r = await anyio.run_process(["nghttp", "-n", "-v", "-t", "20", f"{h.url}/c"])
    text = r.stdout.decode()
    frames = [ln for ln in text.splitlines() if "recv DATA frame" in ln or "recv HEADERS" in ln]
    data = [ln for ln in frames if "DATA" in ln]
    assert frames[-1] is data[-1]  # nothing after the last DATA (no empty frame, no trailers)
    assert "flags=0x01" in data[-1] and "length=0," not in data[-1], data[-1]
    assert all("flags=0x00" in ln for ln in data[:-1])
    assert sum(int(ln.split("length=")[1].split(",")[0]) for ln in data) == 40_000


async def test_a_client_with_open_windows_that_never_reads_stops_the_backend() -> None:
    """Flow control end to end when the client's windows do not: a client that opens its
    windows to 2 GiB and then never reads its socket.  Streams go on past a write only while
    the writer keeps up (``WRITE_BEHIND``); once the kernel's buffers are full every stream
    waits, so what the proxy holds stays bounded and the backend is stopped by its windows,
    never by 10 x 20 MB sitting in the proxy."""
    window = 65536
    streams = 10
    async with running_h2(
        Script(),
        limits={"send_timeout": "60s"},
        cluster={"stream_window": f"{window}B", "connections": 1},
    ) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port, window=2**31 - 1)
        c.h2.increment_flow_control_window(2**31 - 1 - 65535)  # the connection's window too
        sids = [c.request("/big?20000000") for _ in range(streams)]
        await c.flush()  # and never a read: the proxy's writes stall once the kernel is full
        await wait_for(lambda: len(h.proxy.clients) == 1)
        (client,) = h.proxy.clients
        assert isinstance(client, H2ClientConnection)
        pool = h.proxy.pools["app"]

        def held() -> int:
            backend = sum(
                int(conn.core.unacknowledged()) for b in pool.backends for conn in b.conns
            )
            pending = sum(len(d) for st in client.streams.values() for d in st._pending)
            return backend + client.server.queued + pending

        with anyio.fail_after(30):
            while client.waiting_streams < streams:
                assert held() <= WRITE_BEHIND + 2 * streams * window
                await anyio.sleep(0.005)  # polling a condition, bounded by fail_after
        assert held() <= WRITE_BEHIND + 2 * streams * window
        assert len(sids) == streams
        await c.aclose()
