"""A scripted HTTP/2 origin for integration tests: each path is a backend behaviour."""

from __future__ import annotations

import hashlib
import json

import anyio
import h2.errors

from muxproxy.demo.h2server import OriginRequest

CHUNK = 16 * 1024


def pattern(n: int) -> bytes:
    """Deterministic, non-repeating-looking bytes, so truncation or reordering shows."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(str(i).encode()).digest()
        i += 1
    return bytes(out[:n])


class Script:
    """Behaviours by path; state the tests can observe and steer."""

    def __init__(self) -> None:
        self.release = anyio.Event()  # /block waits for it
        self.started: list[OriginRequest] = []  # requests that reached a blocking handler
        self.request_ids: list[str] = []
        self.health_status = 200
        self.served = 0  # requests answered by a normal path (for balance checks)
        self.goaways_sent = 0

    async def __call__(self, req: OriginRequest) -> None:
        path = req.path.decode()
        rid = req.header(b"x-request-id")
        if rid:
            self.request_ids.append(rid.decode())
        route, _, query = path.partition("?")
        if route == "/health":
            await req.respond(self.health_status, [], b"health\n")
        elif route == "/hello":
            self.served += 1
            await req.read_body()
            await req.respond(200, [(b"content-type", b"text/plain")], b"hello\n")
        elif route == "/echo":
            body = await req.read_body()
            await req.respond(200, [(b"x-echo-length", str(len(body)).encode())], body)
        elif route == "/headers":
            await req.read_body()
            hdrs = [[k.decode(), v.decode()] for k, v in req.headers]
            await req.respond(200, [(b"content-type", b"application/json")],
                              json.dumps(hdrs).encode())
        elif route == "/big":
            n = int(query or "1048576")
            data = pattern(n)
            await req.respond(200, [(b"content-length", str(n).encode())], end=False)
            self.started.append(req)
            for i in range(0, n, CHUNK):
                await req.send_data(data[i : i + CHUNK])
            await req.end()
        elif route == "/nolength":
            await req.respond(200, [], end=False)
            await req.send_data(b"part one, ")
            await req.send_data(b"part two")
            await req.end()
        elif route.startswith("/status/"):
            await req.respond(int(route.rsplit("/", 1)[1]), [])
        elif route == "/head-length":
            await req.respond(200, [(b"content-length", b"1234")])
        elif route == "/block":
            self.started.append(req)
            await self.release.wait()
            await req.respond(200, [], b"released\n")
        elif route == "/stall":
            self.started.append(req)
            await anyio.sleep_forever()
        elif route == "/stall-mid-body":
            self.started.append(req)
            await req.respond(200, [(b"content-length", b"100000")], end=False)
            await req.send_data(b"x" * 1000)
            await anyio.sleep_forever()
        elif route == "/reset":
            await req.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif route == "/refuse":
            await req.reset(h2.errors.ErrorCodes.REFUSED_STREAM)
        elif route == "/die-mid-body":
            await req.respond(200, [(b"content-length", b"100000")], end=False)
            await req.send_data(b"x" * 1000)
            await req.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif route == "/trailers":
            await req.respond(200, [], end=False)
            await req.send_data(b"body")
            await req.conn.send_headers(req.stream_id, [(b"x-checksum", b"abc")], end_stream=True)
        elif route == "/goaway-after-body":
            body = await req.read_body()
            if self.goaways_sent == 0:
                # Read the whole body, then disown the stream: it was "never processed".
                self.goaways_sent += 1
                req.conn.goaway(max(0, req.stream_id - 2))
                await req.conn.flush()
                return
            await req.respond(200, [(b"x-echo-length", str(len(body)).encode())], body)
        elif route == "/bad-status":
            await req.respond(999, [])
        else:
            await req.respond(404, [], b"origin: no such path\n")
