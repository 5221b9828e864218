"""A small blocking HTTP/1.1 client: h11 over a real TCP socket, keep-alive, bounded by timeouts."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import h11

TIMEOUT = 30.0
CHUNK = 16 * 1024


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


class ConnectionClosed(Exception):
    """The server closed the connection before the response was complete."""


class H1Client:
    """One client connection; reconnects only between requests, and only when the server said
    it would close (``Connection: close``). ``connects`` counts the TCP connections opened."""

    def __init__(self, host: str, port: int, *, timeout: float = TIMEOUT) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.connects = 0
        self._sock: socket.socket | None = None
        self._conn = h11.Connection(h11.CLIENT)

    def __enter__(self) -> H1Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(
        self,
        method: str,
        target: str,
        *,
        host: str = "localhost",
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        chunked: bool = False,
    ) -> Response:
        """Send one request; ``body`` is framed by Content-Length unless ``chunked``."""
        sock = self._socket()
        head = [("host", host), *headers]
        if chunked:
            head.append(("transfer-encoding", "chunked"))
        elif body is not None:
            head.append(("content-length", str(len(body))))
        out = self._conn.send(h11.Request(method=method, target=target, headers=head)) or b""
        data = body or b""
        for i in range(0, len(data), CHUNK):
            out += self._conn.send(h11.Data(data=data[i : i + CHUNK])) or b""
        out += self._conn.send(h11.EndOfMessage()) or b""
        sock.sendall(out)
        return self._read_response(sock)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = h11.Connection(h11.CLIENT)
            self.connects += 1
        return self._sock

    def _read_response(self, sock: socket.socket) -> Response:
        status, headers, body = 0, [], bytearray()
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data and self._conn.their_state is not h11.DONE:
                    self.close()
                    raise ConnectionClosed(f"EOF after {len(body)} body bytes (status {status})")
                self._conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = [(k.decode().lower(), v.decode()) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                raise ConnectionClosed(f"closed after {len(body)} body bytes (status {status})")
            # h11.InformationalResponse (1xx): keep reading for the final response
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        else:  # MUST_CLOSE: the server announced the close; the next request reconnects
            self.close()
        return Response(status, headers, bytes(body))
