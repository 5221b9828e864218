"""HTTP/3 backend pools: HTTP/1.1 clients → muxproxy → an aioquic origin over QUIC."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import h11
import pytest
import trustme

from muxproxy.demo.h1client import H1Client

from .h3origin import H3Origin
from .harness import Harness, running, wait_for
from .origin import Script, pattern
from .wsclient import WSClient

pytestmark = pytest.mark.anyio


def h3_cluster(ca_path: Path, **extra: object) -> dict[str, object]:
    return {
        "protocol": "h3",
        "tls": f'{{ verify = true, ca = "{ca_path}", server_name = "localhost" }}',
        "connect_timeout": "10s",  # aioquic's pure-Python handshake is slow on a busy box
        **extra,
    }


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


async def start_h3(tg: anyio.abc.TaskGroup, origin: H3Origin) -> int:
    port: int = await tg.start(origin.serve)
    return port


async def test_h3_get_post_and_large_bodies(ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    origin = H3Origin(ca[0], tmp_path)
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=1)) as h:
            c = await h.client()
            r = await c.request("GET", "/hello")
            assert (r.status, r.body) == (200, b"hello\n")
            for size in (0, 1000, 1024 * 1024 + 3):
                body = pattern(size)
                r = await c.request("POST", "/echo", body=body)
                assert r.status == 200
                assert hashlib.sha256(r.body).digest() == hashlib.sha256(body).digest()
            r = await c.request("GET", "/big?3000000")
            assert r.body == pattern(3_000_000)
            for _ in range(20):
                assert (await c.request("GET", "/hello")).status == 200
            await c.aclose()
            assert origin.connections_accepted == 1
            await wait_for(lambda: h.pool().statistics().streams_open == 0)
        tg.cancel_scope.cancel()


async def test_h3_fan_in_2000_clients_over_2_quic_connections(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    origin = H3Origin(ca[0], tmp_path)
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=2, pending_timeout="60s")) as h:
            ok = 0

            async def client() -> None:
                nonlocal ok
                c = await H1Client.connect(h.addr.host, h.addr.port)
                try:
                    r = await c.request("GET", "/hello")
                    ok += r.status == 200 and r.body == b"hello\n"
                finally:
                    await c.aclose()

            with anyio.fail_after(120):
                async with anyio.create_task_group() as clients:
                    for _ in range(2000):
                        clients.start_soon(client)
            assert ok == 2000
            assert origin.connections_accepted == 2
        tg.cancel_scope.cancel()


async def test_h3_certificate_checked(ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    origin = H3Origin(ca[0], tmp_path)
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        cluster = h3_cluster(ca[1], connections=1)
        cluster["tls"] = f'{{ verify = true, ca = "{ca[1]}", server_name = "other.test" }}'
        async with running(Script(), backends=[f"127.0.0.1:{port}"], cluster=cluster) as h:
            r = await h.get("/hello")
            assert r.status == 503
            assert origin.requests_received == 0
        tg.cancel_scope.cancel()


async def test_h3_goaway_replays_unprocessed_with_zero_failures(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    origin = H3Origin(ca[0], tmp_path, goaway_after=25)
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=2, max_replays=4)) as h:
            statuses: list[int] = []

            async def client(n: int) -> None:
                c = await h.client()
                try:
                    for i in range(10):
                        body = f"{n}-{i}".encode()
                        r = await c.request("POST", "/echo", body=body)
                        statuses.append(r.status)
                        assert r.body == body
                finally:
                    await c.aclose()

            with anyio.fail_after(60):
                async with anyio.create_task_group() as clients:
                    for n in range(10):
                        clients.start_soon(client, n)
            assert statuses == [200] * 100
            assert origin.connections_accepted > 2
            assert h.pool().statistics().counters["goaway_received"] >= 1
        tg.cancel_scope.cancel()


async def test_websocket_over_h3_rfc9220(ca: tuple[trustme.CA, Path], tmp_path: Path) -> None:
    """The same tunnel code as over HTTP/2: an extended CONNECT stream on a QUIC connection."""
    origin = H3Origin(ca[0], tmp_path)
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=1),
                           routes='[[routes]]\ncluster = "app"\nwebsocket = true\n') as h:
            sockets = [await WSClient.connect(h.addr.host, h.addr.port) for _ in range(3)]
            for i, ws in enumerate(sockets):
                for message in (f"text {i}", b"\x00bytes", pattern(200_000)):
                    await ws.send(message)
                    assert await ws.receive() == message
            assert origin.websockets_live == 3
            for ws in sockets:
                assert await ws.close(1000) == 1000
            await wait_for(lambda: origin.websockets_live == 0)
            await wait_for(lambda: h.pool().statistics().streams_open == 0)
            assert origin.connections_accepted == 1
        tg.cancel_scope.cancel()


async def test_h3_slow_reader_is_capped_then_reset(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    """QUIC windows grow as data arrives, so the proxy caps what it holds for a slow client:
    past the cap for slow_client_timeout, the stream is reset and the client cut short."""
    origin = H3Origin(ca[0], tmp_path)
    size = 30_000_000
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=1, stream_window="64KiB",
                                              slow_client_timeout="300ms")) as h:
            slow = await anyio.connect_tcp(h.addr.host, h.addr.port)
            await slow.send(f"GET /big?{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            await wait_for(lambda: h.pool().backends[0].conns
                           and h.pool().backends[0].conns[0].core.slow_client_resets == 1,
                           limit=30)
            received = 0
            with anyio.fail_after(30):
                while True:
                    try:
                        received += len(await slow.receive(1 << 20))
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
            assert received < size  # cut short: never a truncated body that looks complete
            assert (await h.get("/hello")).status == 200  # the connection serves the rest
        tg.cancel_scope.cancel()


async def test_h3_stall_is_504_and_neighbours_unaffected(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    origin = H3Origin(ca[0], tmp_path)
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=1,
                                              request_timeout="500ms")) as h:
            statuses: list[int] = []

            async def stalled() -> None:
                statuses.append((await h.get("/stall")).status)

            async with anyio.create_task_group() as clients:
                clients.start_soon(stalled)
                await wait_for(lambda: len(origin.stalled) == 1)
                for _ in range(20):  # the same QUIC connection keeps serving the others
                    assert (await h.get("/hello")).status == 200
            assert statuses == [504]
            await wait_for(lambda: h.pool().statistics().streams_open == 0)
            assert origin.connections_accepted == 1
        tg.cancel_scope.cancel()


async def test_h3_goaway_reject_and_close_under_load_replays_every_rejected(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    """Issue 16.1: a backend that sends GOAWAY after 60 requests, resets every stream at or
    above its id with H3_REQUEST_REJECTED and closes once the streams below are answered.
    Whatever the proxy sees first (reset, GOAWAY or close), every rejected stream is replayed
    and nothing is processed twice."""
    origin = H3Origin(ca[0], tmp_path, goaway_after=60, reject=True, close=True)

    async def requests(h: Harness, n: int, statuses: list[int]) -> None:
        c = await h.client()
        try:
            for i in range(8):
                body = f"{n}-{i}".encode() * 5000
                r = await c.request("POST", "/echo", body=body,
                                    headers=[("x-request-id", f"{n}-{i}")])
                statuses.append(r.status)
                if r.status == 200:
                    assert r.body == body
        finally:
            await c.aclose()

    await _every_rejected_stream_replayed(ca, origin, requests)


ClientLoop = Callable[[Harness, int, list[int]], Awaitable[None]]


async def _every_rejected_stream_replayed(
    ca: tuple[trustme.CA, Path], origin: H3Origin, requests: ClientLoop
) -> None:
    """30 clients run ``requests`` (8 POSTs each, statuses appended) through a pool of one
    connection to ``origin``, which rejects streams: every one gets 200, none is processed
    twice, and the rejections did happen."""
    async with anyio.create_task_group() as tg:
        port = await start_h3(tg, origin)
        async with running(Script(), backends=[f"127.0.0.1:{port}"],
                           cluster=h3_cluster(ca[1], connections=1,
                                              pending_timeout="30s")) as h:
            statuses: list[int] = []
            with anyio.fail_after(120):
                async with anyio.create_task_group() as clients:
                    for n in range(30):
                        clients.start_soon(requests, h, n, statuses)
            assert origin.rejected > 0  # the scenario happened: streams were rejected
            assert origin.connections_accepted >= 3
            assert statuses.count(200) == len(statuses) == 240, sorted(set(statuses))
            assert len(origin.processed_ids) == len(set(origin.processed_ids)) == 240
        tg.cancel_scope.cancel()


async def test_h3_stop_sending_before_goaway_mid_upload_replays_every_rejected(
    ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    """Issue 16.1, the ordering 7630772 lost.  The backend rejects the streams at or above its
    GOAWAY id with STOP_SENDING(H3_REQUEST_REJECTED) at once; the GOAWAY and the RESET_STREAMs
    follow one timer tick later, then the close.  The clients are still uploading when the
    STOP_SENDING arrives: each sends the rest of its body only once the backend has its request
    head (the answer is a short digest, so the backend's STOP_SENDING is not queued behind big
    responses).  7630772 ignored STOP_SENDING and wrote the next body bytes on a stream aioquic
    had already reset: RuntimeError in the exchange, the client's connection dropped without an
    answer.  Every rejected stream must be replayed (within the default max_replays), none
    processed twice."""
    origin = H3Origin(ca[0], tmp_path, goaway_after=60, reject=True, close=True,
                      late_goaway=1)
    size, first = 48_000, 16_000  # within the default 64 KiB replay buffer

    async def post(c: H1Client, rid: str, body: bytes) -> tuple[int, bytes]:
        """Head and the first part of the body; the rest once the backend has the
        request head, so the upload is still running when the backend rejects it."""
        if c.h11.our_state is h11.DONE:
            c.h11.start_next_cycle()
        hdrs = [("host", "localhost"), ("content-length", str(len(body))),
                ("x-request-id", rid)]
        head = c.h11.send(h11.Request(method="POST", target="/sha256", headers=hdrs))
        await c.stream.send(head + c.h11.send(h11.Data(data=body[:first])))
        await wait_for(lambda: rid.encode() in origin.seen_ids, 30)
        await c.stream.send(c.h11.send(h11.Data(data=body[first:]))
                            + c.h11.send(h11.EndOfMessage()))
        r = await c.read_response()
        return r.status, r.body

    async def requests(h: Harness, n: int, statuses: list[int]) -> None:
        c = await h.client()
        try:
            for i in range(8):
                body = f"{n}-{i}.".encode() * (size // 5)
                try:
                    status, got = await post(c, f"{n}-{i}", body)
                except (h11.RemoteProtocolError, anyio.EndOfStream,
                        anyio.BrokenResourceError, OSError):
                    status, got = 0, b""  # dropped without an answer (7630772)
                statuses.append(status)
                if status != 200:
                    await c.aclose()
                    c = await h.client()
                else:
                    assert got == hashlib.sha256(body).hexdigest().encode()
        finally:
            await c.aclose()

    await _every_rejected_stream_replayed(ca, origin, requests)
