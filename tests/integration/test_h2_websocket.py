"""WebSockets from HTTP/2 clients (RFC 8441 extended CONNECT) through muxproxy: to an RFC 8441
backend stream, and to an HTTP/1.1-only backend (the dedicated-connection fallback)."""

from __future__ import annotations

import anyio
import h2.settings
import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage

from .h2client import H2Client, Response
from .h2harness import running_h2
from .harness import wait_for
from .origin import pattern
from .ws_origin import WSScript

pytestmark = pytest.mark.anyio


def ws_routes(fallback: bool) -> str:
    return (f'[[routes]]\ncluster = "app"\nwebsocket = true\n'
            f"websocket_fallback_http1 = {str(fallback).lower()}\n")


async def echo_over_extended_connect(c: H2Client, subprotocol: bool) -> None:
    with anyio.fail_after(10):
        await c.remote_settings.wait()
    assert c.h2.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1
    sid = c.h2.get_next_available_stream_id()
    c.responses[sid] = r = Response()
    c.tunnels.add(sid)
    c.h2.send_headers(sid, [
        (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
        (b":authority", b"localhost"), (b":path", b"/chat"),
        (b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat"),
    ])
    await c.flush()
    await wait_for(lambda: r.status != 0 or r.done.is_set())
    assert r.status == 200, (r.status, bytes(r.body))
    if subprotocol:  # (the HTTP/1.1 echo server negotiates none)
        assert (b"sec-websocket-protocol", b"chat") in r.headers
    assert not any(k == b"sec-websocket-accept" for k, _ in r.headers)
    ws = Connection(ConnectionType.CLIENT)
    got: list[object] = []
    seen = 0

    async def roundtrip(message: str | bytes) -> object:
        nonlocal seen
        msg = TextMessage(message) if isinstance(message, str) else BytesMessage(message)
        c.pending[sid] = ws.send(msg)
        await c.upload()
        want = len(got) + 1
        buf: list[bytes | str] = []
        while len(got) < want:
            await wait_for(lambda at=seen: len(r.body) > at or r.done.is_set())  # type: ignore[misc]
            assert not r.done.is_set(), (r.reset, bytes(r.body), c.goaway)
            ws.receive_data(bytes(r.body[seen:]))
            seen = len(r.body)
            for ev in ws.events():
                if isinstance(ev, TextMessage | BytesMessage):
                    buf.append(ev.data)
                    if ev.message_finished:
                        got.append(b"".join(buf) if isinstance(ev.data, bytes) else "".join(buf))
                        buf = []
        return got[-1]

    for message in ("hello over h2", b"bytes", pattern(200_000)):
        assert await roundtrip(message) == message
    c.pending[sid] = ws.send(CloseConnection(code=1000))
    c.tunnels.discard(sid)  # the close frame, then END_STREAM
    await c.upload()
    await wait_for(lambda: r.done.is_set())
    assert r.reset is None  # the tunnel ended with END_STREAM


@pytest.mark.parametrize("backend", ["rfc8441", "http1"])
async def test_h2_client_websocket_echo(backend: str) -> None:
    script = WSScript()
    options = ({"connect_protocol": True} if backend == "rfc8441"
               else {"connect_protocol": False, "http1_handler": script.http1})
    async with running_h2(script, origin_options=options, cluster={"connections": 1},
                          routes=ws_routes(fallback=backend == "http1")) as h:
        c = await H2Client.connect(h.addr.host, h.addr.port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.run)
            await c.flush()
            await echo_over_extended_connect(c, backend == "rfc8441")
            # the same connection still serves plain requests
            sid = c.request("/hello")
            await c.flush()
            await wait_for(lambda: c.responses[sid].done.is_set())
            assert c.responses[sid].status == 200
            await c.aclose()
        await wait_for(lambda: script.live == 0)
        if backend == "http1":
            assert script.http1_upgrades == 1
        else:
            assert script.opened == 1
