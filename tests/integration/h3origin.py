"""An in-process HTTP/3 origin for tests: aioquic's server side on an anyio UDP socket.

Real QUIC and HTTP/3 (aioquic's state machines, real datagrams on loopback, TLS 1.3 with a
trustme certificate), with scripted paths: /hello, /echo (the request body back), /big?N.
It counts the QUIC connections it accepted (by peer address) and the requests it processed.

With ``goaway_after`` it sends GOAWAY after that many requests on a connection; with
``reject=True`` it then resets every stream at or above the GOAWAY id with H3_REQUEST_REJECTED
(RFC 9114 §4.1.1: not processed), and with ``close=True`` it closes the connection once every
stream below the id is answered and acknowledged (the GOAWAY included).  With
``late_goaway=N`` the rejects' STOP_SENDING still goes at once, but the GOAWAY and the
RESET_STREAMs wait N timer ticks: the proxy sees STOP_SENDING first.  ``processed_ids`` holds
the request ids (``x-request-id``) it processed, so a test can prove none was processed twice;
``seen_ids`` those of every request head received (processed or rejected).  /sha256 answers
with the hex digest of the request body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import trustme
from aioquic.buffer import encode_uint_var
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from wsproto import ConnectionType
from wsproto.connection import Connection as WSProtocol
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from .origin import pattern


@dataclass
class _Stream:
    headers: dict[bytes, bytes]
    body: bytearray = field(default_factory=bytearray)


@dataclass
class _Conn:
    quic: QuicConnection
    h3: H3Connection
    streams: dict[int, _Stream] = field(default_factory=dict)
    processed: int = 0
    goaway_id: int | None = None  # streams with ids from here on are never processed
    answered: list[int] = field(default_factory=list)  # stream ids answered
    closing: bool = False
    to_reset: list[int] = field(default_factory=list)  # rejected: RESET_STREAM on the next tick
    goaway_unsent: int = 0  # late_goaway: timer ticks before the GOAWAY frame is sent
    websockets: dict[int, WSProtocol] = field(default_factory=dict)


class H3Origin:
    def __init__(self, ca: trustme.CA, tmp: Path, *, goaway_after: int = 0,
                 reject: bool = False, close: bool = False, late_goaway: int = 0) -> None:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.certfile = tmp / "h3-cert.pem"
        self.keyfile = tmp / "h3-key.pem"
        self.certfile.write_bytes(b"".join(c.bytes() for c in cert.cert_chain_pems))
        self.keyfile.write_bytes(cert.private_key_pem.bytes())
        self.goaway_after = goaway_after
        self.reject = reject
        self.close = close
        self.late_goaway = late_goaway
        self.processed_ids: list[bytes] = []
        self.seen_ids: set[bytes] = set()  # x-request-id of every request head received
        self.rejected = 0
        self.conns: dict[tuple[str, int], _Conn] = {}
        self.connections_accepted = 0
        self.requests_received = 0
        self.websockets_live = 0
        self.stalled: list[int] = []
        self._sock: anyio.abc.UDPSocket | None = None
        self._send_lock = anyio.Lock()  # the datagram loop and the timer task both send

    def _config(self) -> QuicConfiguration:
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.load_cert_chain(str(self.certfile), str(self.keyfile))
        return config

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as sock:
            self._sock = sock
            task_status.started(sock.extra(anyio.abc.SocketAttribute.local_port))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._timers)
                async for data, addr in sock:
                    peer = (str(addr[0]), int(addr[1]))
                    conn = self.conns.get(peer)
                    if conn is None:
                        quic = QuicConnection(
                            configuration=self._config(),
                            original_destination_connection_id=_dcid(data),
                        )
                        conn = self.conns[peer] = _Conn(quic, H3Connection(quic))
                        self.connections_accepted += 1
                    conn.quic.receive_datagram(data, peer, anyio.current_time())
                    self._process(conn)
                    await self._flush(conn, peer)

    async def _timers(self) -> None:
        while True:
            await anyio.sleep(0.01)  # a test server's timer tick, not a synchronisation
            now = anyio.current_time()
            for peer, conn in list(self.conns.items()):
                if conn.goaway_unsent:
                    conn.goaway_unsent -= 1
                    if not conn.goaway_unsent:
                        self._send_goaway(conn)
                        await self._flush(conn, peer)
                if conn.to_reset and not conn.closing and not conn.goaway_unsent:
                    for sid in conn.to_reset:
                        _abort(conn.quic.reset_stream, sid)
                    conn.to_reset.clear()
                    await self._flush(conn, peer)
                if self._may_close(conn):
                    conn.closing = True
                    conn.quic.close()  # H3_NO_ERROR: every stream below the GOAWAY id is done
                    await self._flush(conn, peer)
                timer = conn.quic.get_timer()
                if timer is not None and timer <= now:
                    conn.quic.handle_timer(now)
                    self._process(conn)
                    await self._flush(conn, peer)

    async def _flush(self, conn: _Conn, peer: tuple[str, int]) -> None:
        assert self._sock is not None
        async with self._send_lock:
            for data, _ in conn.quic.datagrams_to_send(anyio.current_time()):
                await self._sock.sendto(data, *peer)

    def _may_close(self, conn: _Conn) -> bool:
        """Close once every stream below the GOAWAY id is answered and its answer acked."""
        if not self.close or conn.closing or conn.goaway_id is None or conn.goaway_unsent:
            return False
        if len(set(conn.answered)) < conn.goaway_id // 4:  # some are not even received yet
            return False
        streams = conn.quic._streams
        control = streams[conn.h3._local_control_stream_id].sender  # type: ignore[index]
        if control._buffer_start != control._buffer_stop:  # the GOAWAY is not acked yet
            return False
        return all(sid not in streams or streams[sid].sender.is_finished for sid in conn.answered)

    def _reject(self, conn: _Conn, sid: int) -> None:
        """RFC 9114 §4.1.1: H3_REQUEST_REJECTED, the request was not processed.  STOP_SENDING
        goes at once, RESET_STREAM with the next timer tick (each may be seen first)."""
        self.rejected += 1
        conn.streams.pop(sid, None)
        _abort(conn.quic.stop_stream, sid)
        conn.to_reset.append(sid)

    def _process(self, conn: _Conn) -> None:
        while (ev := conn.quic.next_event()) is not None:
            for h in conn.h3.handle_event(ev):
                if isinstance(h, h3e.HeadersReceived):
                    self.seen_ids.add(dict(h.headers).get(b"x-request-id", b""))
                    if conn.goaway_id is not None and h.stream_id >= conn.goaway_id:
                        if self.reject:
                            self._reject(conn, h.stream_id)
                        continue  # after our GOAWAY: never processed
                    fields = dict(h.headers)
                    if fields.get(b":method") == b"CONNECT":
                        self._websocket(conn, h.stream_id, fields)
                        continue
                    conn.streams[h.stream_id] = _Stream(fields)
                    if h.stream_ended:
                        self._answer(conn, h.stream_id)
                elif isinstance(h, h3e.DataReceived) and h.stream_id in conn.websockets:
                    self._websocket_data(conn, h.stream_id, h.data, h.stream_ended)
                elif isinstance(h, h3e.DataReceived):
                    st = conn.streams.get(h.stream_id)
                    if st is not None:
                        st.body += h.data
                        if h.stream_ended:
                            self._answer(conn, h.stream_id)

    def _answer(self, conn: _Conn, sid: int) -> None:
        st = conn.streams.pop(sid)
        self.requests_received += 1
        conn.processed += 1
        self.processed_ids.append(st.headers.get(b"x-request-id", b""))
        conn.answered.append(sid)
        path = st.headers.get(b":path", b"").decode()
        route, _, query = path.partition("?")
        if route == "/stall":
            self.stalled.append(sid)  # never answered: the proxy's request_timeout must act
            return
        if route == "/hello":
            status, body = 200, b"hello\n"
        elif route == "/echo":
            status, body = 200, bytes(st.body)
        elif route == "/sha256":  # the request body's digest: a short answer to a long upload
            status, body = 200, hashlib.sha256(st.body).hexdigest().encode()
        elif route == "/big":
            status, body = 200, pattern(int(query or "1048576"))
        else:
            status, body = 404, b"no such path\n"
        conn.h3.send_headers(sid, [(b":status", str(status).encode()),
                                   (b"content-length", str(len(body)).encode())])
        conn.h3.send_data(sid, body, end_stream=True)
        if self.goaway_after and conn.processed >= self.goaway_after and conn.goaway_id is None:
            # Above every stream processed so far (bodies complete out of order).
            conn.goaway_id = max(conn.answered) + 4
            if self.late_goaway:
                conn.goaway_unsent = self.late_goaway
            else:
                self._send_goaway(conn)
            if self.reject:  # streams already begun at or above the id are never processed
                for other in [s for s in conn.streams if s >= conn.goaway_id]:
                    self._reject(conn, other)

    def _send_goaway(self, conn: _Conn) -> None:
        assert conn.goaway_id is not None
        frame = encode_frame(FrameType.GOAWAY, encode_uint_var(conn.goaway_id))
        conn.quic.send_stream_data(conn.h3._local_control_stream_id, frame)  # type: ignore[arg-type]

    def _websocket(self, conn: _Conn, sid: int, fields: dict[bytes, bytes]) -> None:
        """RFC 9220: an extended CONNECT stream carrying a WebSocket (echoed by wsproto)."""
        self.requests_received += 1
        if fields.get(b":protocol") != b"websocket":
            conn.h3.send_headers(sid, [(b":status", b"400")], end_stream=True)
            return
        conn.h3.send_headers(sid, [(b":status", b"200")])
        conn.websockets[sid] = WSProtocol(ConnectionType.SERVER)
        self.websockets_live += 1

    def _websocket_data(self, conn: _Conn, sid: int, data: bytes, ended: bool) -> None:
        ws = conn.websockets[sid]
        ws.receive_data(data)
        out = b""
        closed = ended
        for ev in ws.events():
            if isinstance(ev, TextMessage | BytesMessage):
                out += ws.send(ev)
            elif isinstance(ev, Ping):
                out += ws.send(ev.response())
            elif isinstance(ev, CloseConnection):
                out += ws.send(ev.response())
                closed = True
        if out or closed:
            conn.h3.send_data(sid, out, end_stream=closed)
        if closed:
            del conn.websockets[sid]
            self.websockets_live -= 1


def _abort(stop: Callable[[int, int], None], sid: int) -> None:
    try:
        stop(sid, ErrorCode.H3_REQUEST_REJECTED)
    except (ValueError, AssertionError):
        pass  # that direction is finished already


def _dcid(datagram: bytes) -> bytes:
    """The destination connection id of a QUIC long-header packet (RFC 9000 §17.2)."""
    length = datagram[5]
    return datagram[6 : 6 + length]


__all__ = ["H3Origin"]
