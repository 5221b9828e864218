"""A minimal blocking HTTP/2 client (h2c prior knowledge or TLS + ALPN h2) over a real socket.

Only used to prove the nginx backend fixture on its own, without muxproxy in between.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h2.config
import h2.connection
import h2.events

TIMEOUT = 15.0


@dataclass
class H2Response:
    stream_id: int
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class _DrainingStateMachine(h2.connection.H2ConnectionStateMachine):
    """python-h2 moves the whole connection to CLOSED on receiving GOAWAY, after which it rejects
    the response of a stream the peer promised to finish (id ≤ last_stream_id). nginx sends its
    GOAWAY before the response of the stream that reached ``keepalive_requests``, so keep the
    connection open (RFC 9113 §6.8) and simply open no more streams."""

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionInputs.RECV_GOAWAY): (
            None,
            h2.connection.ConnectionState.CLIENT_OPEN,
        ),
    }


class StreamFailed(Exception):
    """The stream was reset, or is above a GOAWAY's last_stream_id."""


class H2Direct:
    def __init__(self, port: int, *, ca_file: Path | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
            if sock.selected_alpn_protocol() != "h2":
                raise AssertionError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2")
        self.sock = sock
        self.scheme = "http" if ca_file is None else "https"
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.state_machine = _DrainingStateMachine()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self._streams: dict[int, H2Response] = {}
        self.conn.initiate_connection()
        self._flush()

    def __enter__(self) -> H2Direct:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sock.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_length: bool = True,
        headers: Sequence[tuple[str, str]] = (),
    ) -> H2Response:
        if self.goaway is not None:
            raise StreamFailed(f"no new stream after GOAWAY {self.goaway}")
        sid = self.conn.get_next_available_stream_id()
        head = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", "localhost"),
            (":path", path),
            *headers,
        ]
        if body is not None and content_length:
            head.append(("content-length", str(len(body))))
        self.conn.send_headers(sid, head, end_stream=body is None)
        self._flush()
        resp = self._streams[sid] = H2Response(sid)
        if body is not None:
            self._send_body(sid, body)
        while not resp.ended:
            self._check(resp)
            self._read()
        return resp

    def _send_body(self, sid: int, body: bytes) -> None:
        view = memoryview(body)
        while True:
            size = min(
                len(view),
                self.conn.local_flow_control_window(sid),
                self.conn.max_outbound_frame_size,
            )
            if view and size == 0:  # wait for a WINDOW_UPDATE
                self._check(self._streams[sid])
                self._read()
                continue
            self.conn.send_data(sid, bytes(view[:size]), end_stream=size == len(view))
            self._flush()
            view = view[size:]
            if not view:
                return

    def _check(self, resp: H2Response) -> None:
        last = self.goaway.last_stream_id if self.goaway is not None else None
        if last is not None and resp.stream_id > last:
            raise StreamFailed(f"stream {resp.stream_id} above GOAWAY {self.goaway}")
        if self.closed:
            raise StreamFailed(f"connection closed before stream {resp.stream_id} ended")

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            self._handle(event)
        self._flush()

    def _handle(self, event: Any) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            resp = self._streams[event.stream_id]
            resp.headers = [(str(k), str(v)) for k, v in event.headers]
            resp.status = int(dict(resp.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self._streams[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._streams[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            raise StreamFailed(f"stream {event.stream_id} reset: {event.error_code!r}")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)
