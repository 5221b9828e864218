"""Lean origin for bench/scale.py: WebSocket echo and long-poll, h2c and HTTP/1.1, one port.

Why not hypercorn: hypercorn 0.18's priority tree kills a connection past 1,000 concurrent
streams, and its send scheduler costs O(streams) per frame (bench/README.md, ws_scale). A
scale run needs tens of thousands of streams on one connection, so this is a small asyncio
server on the `h2` state machine, with nothing per stream but what the stream needs.

One listening port (SO_REUSEPORT, `--processes P` processes, each with its own socket: the
20,000-fd limit per process on this box) speaks, per connection, whichever the client starts
with:

- h2c with prior knowledge: RFC 8441 extended CONNECT (`:protocol = websocket`) streams echo
  every WebSocket text/binary frame unmasked; `GET /poll?hold_ms=X` answers 200 after X ms
  (`x-held-ms` says how long it held); anything else 200 at once.
  SETTINGS: MAX_CONCURRENT_STREAMS 1,000,000, ENABLE_CONNECT_PROTOCOL 1, a 1 GiB connection
  receive window (each DATA is acknowledged at once).
- HTTP/1.1: `Upgrade: websocket` (101, then the same echo) and keep-alive `GET /poll?...`.

Limits, stated: no TLS, no request bodies on /poll, no pipelining on HTTP/1.1, no HTTP/2
priority (frames go out in the order they are produced), echo frames are single-frame
messages (no fragmentation), and a stream whose send window is exhausted drops the echo
(64 KiB per stream; the bench's 32-byte messages never get there). h2's stream counting walks
every stream on each new stream (O(streams)); :class:`LeanH2` replaces that with a count of
the streams dict, pruning only streams known to be finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from ws_frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    accept_for,
    frame,
    parse_frame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_HEAD = 16 * 1024


def echo_frames(buf: bytearray) -> tuple[bytes, bool]:
    """Consume complete client frames from buf: (server frames to send, close seen)."""
    out = []
    closing = False
    while (got := parse_frame(buf)) is not None:
        opcode, _fin, payload, used = got
        del buf[:used]
        if opcode in (OP_TEXT, OP_BINARY):
            out.append(frame(opcode, payload, masked=False))
        elif opcode == OP_PING:
            out.append(frame(OP_PONG, payload, masked=False))
        elif opcode == OP_CLOSE:
            out.append(frame(OP_CLOSE, payload[:2], masked=False))
            closing = True
            break
    return b"".join(out), closing


def hold_seconds(path: str) -> float | None:
    """The hold of a /poll request in seconds, or None if it is not one."""
    parts = urlsplit(path)
    if parts.path != "/poll":
        return None
    values = parse_qs(parts.query).get("hold_ms", ["0"])
    try:
        return max(0.0, min(60_000.0, float(values[0]))) / 1000
    except ValueError:
        return 0.0


class LeanH2(h2.connection.H2Connection):
    """h2 with O(1) stream counting: finished streams are pruned as they finish."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.finished: list[int] = []

    def _open_streams(self, remainder: int) -> int:
        streams = self.streams
        for sid in self.finished:
            stream = streams.get(sid)
            if stream is not None and stream.closed:
                del streams[sid]
                self._closed_streams[sid] = stream.closed_by
        self.finished.clear()
        return len(streams)


class Origin(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.mode = ""  # "", "h2", "h1", "ws"
        self.h2: LeanH2 | None = None
        self.ws: dict[int, bytearray] = {}  # h2 stream id -> unread WebSocket bytes
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.h1_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if self.h1_timer is not None:
            self.h1_timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.mode == "h2":
            self.h2_data(data)
            return
        self.buf += data
        if not self.mode:
            if len(self.buf) < len(PREFACE) and PREFACE.startswith(bytes(self.buf)):
                return
            if self.buf.startswith(PREFACE):
                self.mode = "h2"
                self.h2_start()
                data, self.buf = bytes(self.buf), bytearray()
                self.h2_data(data)
                return
            self.mode = "h1"
        if self.mode == "ws":
            out, closing = echo_frames(self.buf)
            assert self.transport is not None
            if out:
                self.transport.write(out)
            if closing:
                self.transport.close()
        else:
            self.h1_data()

    # --- HTTP/1.1 ------------------------------------------------------------------------

    def h1_data(self) -> None:
        assert self.transport is not None
        if self.h1_timer is not None:
            return  # one request at a time (no pipelining)
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self.transport.abort()
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        path = parts[1] if len(parts) > 1 else "/"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("upgrade", "").lower() == "websocket":
            key = headers.get("sec-websocket-key", "").encode()
            accept = accept_for(key).decode()
            self.transport.write(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n".encode()
            )
            self.mode = "ws"
            if self.buf:
                self.data_received(b"")
            return
        hold = hold_seconds(path)
        if hold:
            self.h1_timer = self.loop.call_later(hold, self.h1_respond, hold)
        else:
            self.h1_respond(0.0)

    def h1_respond(self, hold: float) -> None:
        self.h1_timer = None
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
            b"X-Held-Ms: %d\r\n\r\nok" % round(hold * 1000)
        )
        if self.buf:
            self.h1_data()

    # --- HTTP/2 --------------------------------------------------------------------------

    def h2_start(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = LeanH2(config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1_000_000,
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(2**30 - 65535)
        self.h2 = conn

    def h2_flush(self) -> None:
        assert self.h2 is not None and self.transport is not None
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def h2_data(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None and self.transport is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.h2_flush()
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.h2_request(event)
            elif isinstance(event, h2.events.DataReceived):
                sid = event.stream_id
                conn.acknowledge_received_data(event.flow_controlled_length, sid)
                buf = self.ws.get(sid)
                if buf is not None and event.data:
                    buf += event.data
                    out, closing = echo_frames(buf)
                    with contextlib.suppress(h2.exceptions.H2Error):
                        if out:
                            conn.send_data(sid, out, end_stream=closing)
                        elif closing:
                            conn.end_stream(sid)
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                if self.ws.pop(sid, None) is not None:
                    with contextlib.suppress(h2.exceptions.H2Error):
                        conn.end_stream(sid)
                conn.finished.append(sid)
            elif isinstance(event, h2.events.StreamReset):
                sid = event.stream_id
                self.ws.pop(sid, None)
                timer = self.timers.pop(sid, None)
                if timer is not None:
                    timer.cancel()
                conn.finished.append(sid)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.h2_flush()
                self.transport.close()
                return
        self.h2_flush()

    def h2_request(self, event: h2.events.RequestReceived) -> None:
        conn = self.h2
        assert conn is not None
        headers = {bytes(k): bytes(v) for k, v in event.headers or ()}
        sid = event.stream_id
        if headers.get(b":method") == b"CONNECT" and headers.get(b":protocol") == b"websocket":
            conn.send_headers(sid, [(b":status", b"200")])
            self.ws[sid] = bytearray()
            return
        hold = hold_seconds(headers.get(b":path", b"/").decode("latin-1"))
        if hold:
            self.timers[sid] = self.loop.call_later(hold, self.h2_respond, sid, hold)
        else:
            self.h2_respond(sid, 0.0, flush=False)

    def h2_respond(self, sid: int, hold: float, flush: bool = True) -> None:
        conn = self.h2
        assert conn is not None
        self.timers.pop(sid, None)
        with contextlib.suppress(h2.exceptions.H2Error, KeyError):
            conn.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-length", b"2"),
                    (b"x-held-ms", b"%d" % round(hold * 1000)),
                ],
            )
            conn.send_data(sid, b"ok", end_stream=True)
        conn.finished.append(sid)
        if flush:
            self.h2_flush()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(lambda: Origin(loop), sock=sock, backlog=4096)
    await server.serve_forever()


def child(port: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port))
    else:
        uvloop.run(serve(port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--processes", type=int, default=1, help="SO_REUSEPORT processes (1)")
    args = parser.parse_args(argv)
    children: list[int] = []
    for _ in range(max(1, args.processes)):
        pid = os.fork()
        if pid == 0:
            try:
                child(args.port)
            finally:
                os._exit(0)
        children.append(pid)

    def stop(signum: int, frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while children:
        pid, _ = os.wait()
        if pid in children:
            children.remove(pid)
            stop(signal.SIGTERM, None)  # one died: the origin is broken, stop the rest
    return 0


if __name__ == "__main__":
    sys.exit(main())
