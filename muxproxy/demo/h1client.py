"""A minimal keep-alive HTTP/1.1 client on anyio + h11: the demo's load, and the tests' client."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.abc
import h11


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class H1Client:
    """One client connection; ``request()`` may be called repeatedly (keep-alive)."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, host: str, port: int) -> H1Client:
        return cls(await anyio.connect_tcp(host, port))

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str = "localhost",
    ) -> Response:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        hdrs = [("host", host), *(headers or [])]
        if body or method in ("POST", "PUT"):
            hdrs.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send(data)
        return await self.read_response()

    async def read_response(self) -> Response:
        head: h11.Response | None = None
        parts: list[bytes] = []
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA:
                try:
                    data = await self.stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                self.h11.receive_data(data)
                continue
            if isinstance(ev, h11.Response):
                head = ev
            elif isinstance(ev, h11.Data):
                parts.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                assert head is not None
                return Response(head.status_code, list(head.headers), b"".join(parts))
            elif isinstance(ev, h11.ConnectionClosed):
                raise anyio.EndOfStream("connection closed before the response ended")

    async def aclose(self) -> None:
        await self.stream.aclose()
