"""A small HTTP/2 client on the ``h2`` library, for tests that need what curl cannot do:
many streams with their bodies checked, resets, floods, zero windows, extended CONNECT."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    reset: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    interim: list[int] = field(default_factory=list)  # 1xx statuses, in order
    interim_seen: anyio.Event = field(default_factory=anyio.Event)


class H2Client:
    def __init__(self, stream: anyio.abc.ByteStream, *, auto_ack: bool = True,
                 window: int | None = None, after_goaway: bool = False) -> None:
        self.stream = stream
        # h2 ends the whole connection on a GOAWAY; with after_goaway the client reads the
        # GOAWAY itself and goes on with the streams in flight, as curl and nghttp do.
        self.after_goaway = after_goaway
        self.hold: set[int] = set()  # streams whose window is never opened (connection's is)
        self._frames = b""
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None,
                                         validate_outbound_headers=False,
                                         normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(cfg)
        self.auto_ack = auto_ack
        self.responses: dict[int, Response] = {}
        self.pending: dict[int, bytes] = {}
        self.tunnels: set[int] = set()  # streams whose pending bytes never end the stream
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = anyio.Event()
        self.remote_settings = anyio.Event()
        self.h2.initiate_connection()
        if window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self._window = anyio.Event()
        self._lock = anyio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, *, tls: ssl.SSLContext | None = None,
                      **kw: Any) -> H2Client:
        stream: anyio.abc.ByteStream = await anyio.connect_tcp(
            host, port, tls=tls is not None, ssl_context=tls, tls_standard_compatible=False,
            **({"tls_hostname": "localhost"} if tls else {}))
        return cls(stream, **kw)

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send(data)

    def request(self, path: str, *, method: str = "GET", body: bytes | None = None,
                headers: list[tuple[bytes, bytes]] | None = None,
                authority: str = "localhost", extra: list[tuple[bytes, bytes]] | None = None,
                ) -> int:
        """Queue a request (its body only as far as the window allows); returns its id."""
        sid = self.h2.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"http"),
                  (b":authority", authority.encode()), (b":path", path.encode()),
                  *(extra or []), *(headers or [])]
        self.h2.send_headers(sid, fields, end_stream=body is None)
        self.responses[sid] = Response()
        if body is not None:
            self.pending[sid] = body
        return sid

    async def upload(self) -> None:
        """Send the queued request bodies as the windows open."""
        await self.flush()
        while self.pending:
            window = self._window  # (a WINDOW_UPDATE during the flush below sets this one)
            progress = False
            for sid, body in list(self.pending.items()):
                if self.responses[sid].done.is_set():
                    del self.pending[sid]
                    continue
                n = min(len(body), self.h2.local_flow_control_window(sid),
                        self.h2.max_outbound_frame_size)
                if n > 0 or not body:
                    end = n == len(body) and sid not in self.tunnels
                    self.h2.send_data(sid, body[:n], end_stream=end)
                    progress = True
                    if n == len(body):
                        del self.pending[sid]
                    else:
                        self.pending[sid] = body[n:]
            await self.flush()
            if not progress:
                await window.wait()

    async def run(self) -> None:
        """Read until the connection ends."""
        try:
            while True:
                try:
                    data = await self.stream.receive(65536)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                        OSError):
                    break
                if self.after_goaway:
                    data = self._take_goaway(data)
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for ev in events:
                    self._event(ev)
                try:
                    await self.flush()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    break
        finally:
            for r in self.responses.values():
                r.done.set()
            self.closed.set()

    def _take_goaway(self, data: bytes) -> bytes:
        """The whole frames of ``data`` (after the server preface) without GOAWAY frames,
        which are recorded in ``self.goaway``."""
        buf, out = self._frames + data, b""
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = 9 + int.from_bytes(buf[:3], "big")
            f, buf = buf[:n], buf[n:]
            if f[3] == 0x7:
                ev = h2.events.ConnectionTerminated()
                ev.last_stream_id = int.from_bytes(f[9:13], "big") & 0x7FFFFFFF
                ev.error_code = int.from_bytes(f[13:17], "big")  # type: ignore[assignment]
                ev.additional_data = f[17:]
                self.goaway = ev
            else:
                out += f
        self._frames = buf
        return out

    def _event(self, ev: h2.events.Event) -> None:
        E = h2.events
        if isinstance(ev, E.ResponseReceived):
            r = self.responses[ev.stream_id]
            for k, v in ev.headers:
                if k == b":status":
                    r.status = int(v)
                else:
                    r.headers.append((k, v))
        elif isinstance(ev, E.InformationalResponseReceived):
            r = self.responses[ev.stream_id]
            r.interim.append(int(dict(ev.headers)[b":status"]))
            r.interim_seen.set()
        elif isinstance(ev, E.DataReceived):
            self.responses[ev.stream_id].body += ev.data
            if self.auto_ack and ev.stream_id in self.hold:
                self.h2.increment_flow_control_window(ev.flow_controlled_length)
            elif self.auto_ack:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, E.TrailersReceived):
            self.responses[ev.stream_id].trailers = list(ev.headers)
        elif isinstance(ev, E.StreamEnded):
            self.responses[ev.stream_id].done.set()
        elif isinstance(ev, E.StreamReset):
            r = self.responses.get(ev.stream_id)
            if r is not None:
                r.reset = ev.error_code
                r.done.set()
        elif isinstance(ev, E.ConnectionTerminated):
            self.goaway = ev
        elif isinstance(ev, E.RemoteSettingsChanged):
            self.remote_settings.set()
        elif isinstance(ev, E.WindowUpdated):
            self._window.set()
            self._window = anyio.Event()

    async def aclose(self) -> None:
        await self.stream.aclose()
