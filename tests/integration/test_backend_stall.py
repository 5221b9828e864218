"""A backend that stops reading while it keeps talking (issue 16, item 6).

A small h2 server on loopback answers GETs; on ``POST /stall`` it stops reading that connection
and floods PINGs.  What the proxy sends is no longer answered: either its
writes stop draining (the kernel's buffers fill: asyncio, trio) or they drain into the backend's
autotuned receive buffer and the proxy's PING goes unanswered (uvloop on loopback: 24 MiB
vanish into a 32 MiB ``tcp_rmem``).  Either way new streams must not be placed on it (they would
hang until ``request_timeout``), and once it has not answered for ``ping_timeout`` it is dead —
the PINGs it sends prove nothing — its never-sent streams are replayed on the replacement and
the upload it was swallowing fails with a 502.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from muxproxy.config import loads
from muxproxy.demo.h1client import H1Client
from muxproxy.io.server import Proxy

from ..conftest import UVLOOP
from .harness import config_text, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", UVLOOP, "trio"], ids=["asyncio", "uvloop", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param

UPLOAD = 24 * 1024 * 1024  # far beyond the loopback socket buffers (a few MiB each way)


class StallingBackend:
    def __init__(self) -> None:
        self.connections = 0
        self.stalled = anyio.Event()
        self.resume = anyio.Event()
        self.gets = 0
        self.uploads = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started(port)
        await listener.serve(self.handle)

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2 * UPLOAD})
        conn.increment_flow_control_window(2 * UPLOAD)
        paused: set[int] = set()
        try:
            await stream.send(conn.data_to_send())
            while True:
                data = await stream.receive()
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.StreamEnded) and ev.stream_id in paused:
                        self.uploads += 1
                        conn.send_headers(ev.stream_id, [(b":status", b"200")], end_stream=True)
                    if not isinstance(ev, h2.events.RequestReceived):
                        continue
                    sid = ev.stream_id
                    path = dict(ev.headers or ())[b":path"]
                    if path == b"/pause":  # stop reading until the test says so
                        paused.add(sid)
                        await stream.send(conn.data_to_send())
                        self.stalled.set()
                        await self.resume.wait()
                        continue
                    if path == b"/stall":
                        await stream.send(conn.data_to_send())
                        self.stalled.set()
                        while True:  # never read again; talk all the time
                            conn.ping(b"flooding")
                            await stream.send(conn.data_to_send())
                            await anyio.sleep(0.005)
                    self.gets += 1
                    conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
                    conn.send_data(sid, b"ok", end_stream=True)
                await stream.send(conn.data_to_send())
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass


async def test_connection_the_backend_does_not_read_takes_no_streams_and_dies() -> None:
    backend = StallingBackend()
    async with anyio.create_task_group() as tg:
        port = await tg.start(backend.serve)
        cfg = loads(
            config_text(
                [f"127.0.0.1:{port}"],
                cluster={
                    "connections": 1,
                    "ping_interval": "200ms",
                    "ping_timeout": "500ms",
                    "request_timeout": "20s",
                    "pending_timeout": "20s",
                },
            )
        )
        proxy = Proxy(cfg)
        bound = await tg.start(proxy.serve)
        edge = bound["edge"]
        upload_status: list[int | str] = []

        async def upload() -> None:
            c = await H1Client.connect(edge.host, edge.port)
            try:
                r = await c.request("POST", "/stall", body=b"x" * UPLOAD)
                upload_status.append(r.status)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                upload_status.append(type(exc).__name__)
            finally:
                await c.aclose()

        tg.start_soon(upload)
        await backend.stalled.wait()
        pool = proxy.pools["app"]
        first = pool.backends[0].conns[0]
        # The writer is stuck: the connection stops offering streams (today's code: never).
        await wait_for(lambda: first.free == 0 and not first.core.draining)
        statuses: list[int] = []

        async def get() -> None:
            c = await H1Client.connect(edge.host, edge.port)
            try:
                statuses.append((await c.request("GET", "/after")).status)
            finally:
                await c.aclose()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as gets:
                for _ in range(5):
                    gets.start_soon(get)
            await wait_for(lambda: bool(upload_status), 30)
        # every GET answered by the replacement, none waited for request_timeout
        assert statuses == [200] * 5
        assert backend.gets == 5 and backend.connections == 2
        # the swallowed upload was processed in part: a 502, never replayed
        assert upload_status == [502]
        assert first.write_stalls == 1 and first.closed.is_set()
        tg.cancel_scope.cancel()


async def test_a_backend_that_resumes_reading_keeps_its_connection() -> None:
    """A write stall shorter than ping_timeout: the connection takes no streams meanwhile, its
    PINGs go unanswered, and once the backend reads again it is alive and takes streams again."""
    backend = StallingBackend()
    async with anyio.create_task_group() as tg:
        port = await tg.start(backend.serve)
        cfg = loads(
            config_text(
                [f"127.0.0.1:{port}"],
                cluster={"connections": 1, "ping_interval": "100ms", "ping_timeout": "30s"},
            )
        )
        proxy = Proxy(cfg)
        edge = (await tg.start(proxy.serve))["edge"]
        statuses: list[int] = []

        async def request(method: str, path: str, body: bytes = b"") -> None:
            c = await H1Client.connect(edge.host, edge.port)
            try:
                statuses.append((await c.request(method, path, body=body)).status)
            finally:
                await c.aclose()

        tg.start_soon(request, "POST", "/pause", b"x" * UPLOAD)
        await backend.stalled.wait()
        conn = proxy.pools["app"].backends[0].conns[0]
        await wait_for(
            lambda: conn.free == 0 and (conn.send_since is not None or conn.ping_since is not None)
        )
        pinged = conn.wheel.now
        await wait_for(lambda: conn.wheel.now > pinged + 0.5)  # PINGs went out unanswered
        backend.resume.set()
        await wait_for(lambda: statuses == [200], 30)
        await request("GET", "/after")
        assert statuses == [200, 200]
        assert backend.connections == 1 and backend.uploads == 1 and backend.gets == 1
        assert conn.ping_timeouts == 0 and conn.write_stalls == 0 and not conn.closed.is_set()
        tg.cancel_scope.cancel()


async def test_a_backend_that_floods_pings_and_reads_nothing_is_dead_on_every_loop() -> None:
    """No upload at all: nothing fills a socket buffer, so only the unanswered PING tells.  The
    backend's own PINGs (every 5 ms) prove nothing; the GET it swallowed is a 502 (sent, maybe
    processed), the next ones go to the replacement."""
    backend = StallingBackend()
    async with anyio.create_task_group() as tg:
        port = await tg.start(backend.serve)
        cfg = loads(
            config_text(
                [f"127.0.0.1:{port}"],
                cluster={"connections": 1, "ping_interval": "100ms", "ping_timeout": "400ms"},
            )
        )
        proxy = Proxy(cfg)
        edge = (await tg.start(proxy.serve))["edge"]
        statuses: list[int] = []

        async def get(path: str) -> None:
            c = await H1Client.connect(edge.host, edge.port)
            try:
                statuses.append((await c.request("GET", path)).status)
            finally:
                await c.aclose()

        with anyio.fail_after(30):
            tg.start_soon(get, "/stall")
            await backend.stalled.wait()
            first = proxy.pools["app"].backends[0].conns[0]
            await wait_for(lambda: first.closed.is_set() and bool(statuses), 30)
            assert statuses == [502]
            await get("/after")
        assert statuses == [502, 200]
        assert backend.connections == 2 and backend.gets == 1
        assert first.write_stalls == 1 and first.ping_timeouts == 0
        tg.cancel_scope.cancel()
