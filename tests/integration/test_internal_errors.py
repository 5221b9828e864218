"""A bug of ours costs one connection, or one HTTP/2 stream, never the proxy, on every loop.

The bug is put in by replacing a function of muxproxy's with one that raises (the network stays
real: a real origin, real client sockets).  Each test checks what the client sees, that the
proxy goes on serving, and ``muxproxy_internal_errors_total``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import anyio
import pytest

import muxproxy.io.client
import muxproxy.io.h2stream
from muxproxy.io.admin import metrics_text
from muxproxy.io.client_h2 import H2ClientConnection

from .h2client import H2Client
from .h2harness import running_h2
from .harness import running
from .origin import Script

pytestmark = pytest.mark.anyio


def _buggy_dispatch(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    real = module.dispatch

    def dispatch(down: Any, head: Any, *args: Any, **kw: Any) -> Awaitable[bool]:
        if head.target.startswith(b"/boom"):
            raise RuntimeError("a bug in dispatch")
        return real(down, head, *args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(module, "dispatch", dispatch)


async def test_http1_bug_costs_its_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _buggy_dispatch(monkeypatch, muxproxy.io.client)
    async with running(Script()) as h:
        got = await h.raw(b"GET /boom HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert got == b""  # closed, nothing half-said
        assert h.proxy.internal_errors == 1
        # one line naming the error itself, not the group except* wrapped it in
        assert "internal error: RuntimeError('a bug in dispatch')" in caplog.text
        r = await h.get("/hello")  # the proxy goes on
        assert r.status == 200
        assert "muxproxy_internal_errors_total 1\n" in metrics_text(h.proxy.statistics())


async def test_h2_bug_costs_its_stream_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _buggy_dispatch(monkeypatch, muxproxy.io.h2stream)
    async with running_h2(Script()) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            bad = c.request("/boom")
            good = c.request("/hello")
            await c.upload()
            with anyio.fail_after(10):
                await c.responses[bad].done.wait()
                await c.responses[good].done.wait()
            assert c.responses[bad].reset is not None  # RST_STREAM, that stream alone
            assert c.responses[good].status == 200 and bytes(c.responses[good].body) == b"hello\n"
            again = c.request("/hello")  # the same connection takes new streams
            await c.upload()
            with anyio.fail_after(10):
                await c.responses[again].done.wait()
            assert c.responses[again].status == 200
            await c.aclose()
        assert h.proxy.internal_errors == 1


async def test_bug_while_cancelled_stays_in_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug met while the proxy's shutdown cancels a connection comes, on trio, in one
    exception group with trio's Cancelled; the bug is counted and the cancellation goes on,
    so the proxy's task group ends cleanly instead of raising the bug."""
    real = H2ClientConnection._writer

    async def writer(self: H2ClientConnection) -> None:
        try:
            await real(self)
        except anyio.get_cancelled_exc_class():
            raise RuntimeError("a bug in the writer's cleanup") from None

    monkeypatch.setattr(H2ClientConnection, "_writer", writer)
    async with running_h2(Script()) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            sid = c.request("/hello")
            await c.upload()
            with anyio.fail_after(10):
                await c.responses[sid].done.wait()
            assert c.responses[sid].status == 200
            proxy = h.proxy
            tg.cancel_scope.cancel()
        # leaving running_h2 cancels the proxy with the connection still open
    assert proxy.internal_errors == 1
    await c.aclose()


async def test_backend_connection_bug_while_cancelled_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for a backend connection: its writer's bug during the proxy's shutdown is
    the pool's ``internal_errors``, not an exception out of the proxy."""
    from muxproxy.io.backend import BackendConnection

    real = BackendConnection._writer

    async def writer(self: BackendConnection) -> None:
        try:
            await real(self)
        except anyio.get_cancelled_exc_class():
            raise RuntimeError("a bug in the writer's cleanup") from None

    monkeypatch.setattr(BackendConnection, "_writer", writer)
    async with running(Script()) as h:
        r = await h.get("/hello")
        assert r.status == 200
        pool = h.pool()
    assert pool.counters["internal_errors"] >= 1
