"""WebSocket load-generator process for bench/ws_scale.py (stdlib + optional uvloop).

One process opens `--count` WebSockets to 127.0.0.1:`--port` with hand-written RFC 6455
handshakes and masked frames on plain asyncio protocols (a few hundred bytes of client state
per socket, so the load side stays small next to the proxy). Client sockets are bound to the
given 127.0.0.x `--sources` in turn, with IP_BIND_ADDRESS_NO_PORT so the kernel picks the
source port per 4-tuple at connect() time: each source address has its own ephemeral range.

It ramps up with at most `--batch` handshakes in flight, then keeps the sockets idle and obeys
one-line JSON commands on stdin, answering with one JSON line each on stdout:

    {"cmd": "status"}                             -> {"type": "status", "open": ..., ...}
    {"cmd": "echo", "count": K, "rate": R, "seconds": D, "size": B, "timeout": S}
        -> K randomly chosen open sockets send B-byte text messages, R per second in total
           (each socket one every K/R s, at a random phase) for D seconds, and time each
           echo; {"type": "echo", "lat_ms": [...], ...}
    {"cmd": "stop_ramp"}                          -> opens no more ("opened" comes when the
                                                     handshakes in flight are over)
    {"cmd": "quit"}                               -> closes everything and exits

Progress lines ({"type": "progress", ...}) are printed once a second during the ramp and
{"type": "opened", ...} when it is over. The process stops by itself when stdin closes (the
harness went away) and in any case after `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import json
import os
import random
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import cast

from ws_frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, accept_for, frame, parse_frame

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MAX_HEAD = 16 * 1024


# --------------------------------------------------------------------------- frames


def handshake_request(host: str, path: str) -> tuple[bytes, bytes]:
    """(request bytes, expected Sec-WebSocket-Accept value)."""
    key = base64.b64encode(os.urandom(16))
    accept = accept_for(key)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return request, accept


def check_response_head(head: bytes, accept: bytes) -> str | None:
    """None if `head` (up to and without the blank line) is a valid 101 for `accept`."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"101":
        return "status " + (parts[1].decode(errors="replace") if len(parts) > 1 else "?")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            return None if value.strip() == accept else "bad Sec-WebSocket-Accept"
    return "no Sec-WebSocket-Accept"


def echo_once(port: int, timeout: float = 5.0, path: str = "/ws") -> str | None:
    """Blocking smoke test: one WebSocket, one echoed message. None if it worked."""
    request, accept = handshake_request("bench.test", path)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    return f"connection closed during the handshake ({buf[:80]!r})"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            problem = check_response_head(head, accept)
            if problem:
                return f"handshake: {problem}"
            sock.sendall(frame(OP_TEXT, b"smoke-test", masked=True))
            while (echo := parse_frame(buf)) is None:
                chunk = sock.recv(4096)
                if not chunk:
                    return "connection closed before the echo"
                buf += chunk
            if echo[0] != OP_TEXT or echo[2] != b"smoke-test":
                return f"unexpected echo frame {echo[:3]!r}"
            # No close handshake: hypercorn 0.18 drops the stream once its side has closed and
            # then dies on the proxy's END_STREAM for it (KeyError in its h2 DATA handler),
            # taking the whole h2 connection down. An abort ends the stream while it exists.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- async client


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(exc, TimeoutError):
        return "timeout"
    return exc.__class__.__name__ + (f": {exc}" if str(exc) else "")


class WS(asyncio.Protocol):
    """One client WebSocket: handshake, then text/binary frames go to the waiting echo."""

    __slots__ = (
        "_request",
        "accept",
        "buf",
        "closed",
        "handshake",
        "loop",
        "transport",
        "upgraded",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes, accept: bytes) -> None:
        self.loop = loop
        self.accept = accept
        self.buf = bytearray()
        self.closed: str | None = None
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.upgraded = False
        self.waiter: asyncio.Future[bytes] | None = None
        self._request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._request)
        del self._request

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._fail_handshake("response head too large")
                return
            problem = check_response_head(bytes(self.buf[:end]), self.accept)
            del self.buf[: end + 4]
            if problem:
                self._fail_handshake(problem)
                return
            self.upgraded = True
            if not self.handshake.done():
                self.handshake.set_result(None)
        while (frame := parse_frame(self.buf)) is not None:
            opcode, _fin, payload, used = frame
            del self.buf[:used]
            if opcode in (OP_TEXT, OP_BINARY):
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(payload)
            elif opcode == OP_PING:
                self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.closed = f"close frame {code}"
                self.send(OP_CLOSE, payload[:2])
                assert self.transport is not None
                self.transport.close()
                return

    def _fail_handshake(self, problem: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(problem))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            self.closed = _reason(exc) if exc is not None else "closed by peer"
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"handshake: {self.closed}"))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(self.closed))

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(opcode, payload, masked=True))

    async def echo(self, payload: bytes, timeout: float) -> float:
        """One round trip; returns its duration in milliseconds."""
        if self.closed is not None:
            raise ConnectionError(self.closed)
        self.waiter = self.loop.create_future()
        start = time.perf_counter()
        self.send(OP_TEXT, payload)
        try:
            reply = await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None
        elapsed = (time.perf_counter() - start) * 1000
        if reply != payload:
            raise ValueError("echo payload mismatch")
        return elapsed


class Pacer:
    """The schedule of a paced phase: each client at its own random phase, once per
    `period` s, until `seconds` are over. A client still busy at its next slot goes at once
    when free, counted in `late` once it is more than a period behind."""

    def __init__(self, period: float, seconds: float) -> None:
        self.period = period
        self.start = time.monotonic() + 0.1
        self.end = self.start + seconds
        self.late = 0

    async def slots(self) -> AsyncIterator[int]:
        """Yields 0, 1, 2, ... at one client's slots."""
        slot = self.start + random.uniform(0, self.period)
        n = 0
        while slot < self.end:
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -self.period:
                self.late += 1
            yield n
            n += 1
            slot += self.period


class LoadProcess:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.sockets: list[WS] = []
        self.failures: Counter[str] = Counter()
        self.started = 0
        self.ramp_stopped = False  # {"cmd": "stop_ramp"}: the harness saw the proxy stall

    def emit(self, message: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def new_client(self) -> WS:
        """The protocol of one client connection (the HTTP load overrides this)."""
        request, accept = handshake_request("bench.test", self.args.path)
        return WS(self.loop, request, accept)

    async def handshake(self, client: WS) -> None:
        """Wait until the client is open; raise why not (the HTTP load overrides this)."""
        await client.handshake

    async def open_one(self, index: int) -> None:
        source = self.args.sources[index % len(self.args.sources)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        protocol: WS | None = None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            async with asyncio.timeout(self.args.handshake_timeout):
                await self.loop.sock_connect(sock, ("127.0.0.1", self.args.port))
                _, protocol = await self.loop.create_connection(self.new_client, sock=sock)
                await self.handshake(protocol)
        except Exception as exc:  # every failure is counted by reason, none stops the ramp
            self.failures[_reason(exc)] += 1
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            else:
                sock.close()
            return
        self.sockets.append(protocol)

    async def ramp(self) -> None:
        count = self.args.count
        deadline = time.monotonic() + self.args.ramp_timeout
        start = time.monotonic()

        async def worker() -> None:
            while self.started < count and time.monotonic() < deadline and not self.ramp_stopped:
                index = self.started
                self.started += 1
                await self.open_one(index)

        async def progress() -> None:
            while True:
                await asyncio.sleep(1.0)
                self.emit(
                    {"type": "progress", "open": len(self.sockets), "failed": self.total_failed()}
                )

        reporter = asyncio.ensure_future(progress())
        try:
            await asyncio.gather(*(worker() for _ in range(min(self.args.batch, count))))
        finally:
            reporter.cancel()
        not_started = count - self.started
        if not_started:
            why = "ramp stopped" if self.ramp_stopped else "ramp timeout"
            self.failures[f"{why} (not attempted)"] += not_started
        self.emit(
            {
                "type": "opened",
                "open": len(self.sockets),
                "failed": self.total_failed(),
                "failures": dict(self.failures),
                "seconds": round(time.monotonic() - start, 3),
            }
        )

    def total_failed(self) -> int:
        return sum(self.failures.values())

    def status(self) -> dict[str, object]:
        reasons = Counter(ws.closed for ws in self.sockets if ws.closed is not None)
        return {
            "type": "status",
            "open": sum(1 for ws in self.sockets if ws.closed is None),
            "closed": sum(reasons.values()),
            "closed_reasons": dict(reasons),
        }

    async def echo(
        self, count: int, rate: float, seconds: float, size: int, timeout: float
    ) -> dict[str, object]:
        """Paced echo load: `count` random open sockets send `rate` messages/s in total for
        `seconds` (each socket every count/rate s, at a random phase). A socket whose echo is
        still outstanding at its next slot sends as soon as the echo is in (counted as late).
        """
        alive = [ws for ws in self.sockets if ws.closed is None]
        chosen = random.sample(alive, min(count, len(alive)))
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        pacer = Pacer(len(chosen) / rate if rate > 0 else 0.0, seconds)

        async def one(ws: WS, tag: int) -> None:
            async for n in pacer.slots():
                payload = f"{tag:08d}:{n:06d}:".encode().ljust(size, b"x")
                try:
                    latencies.append(await ws.echo(payload, timeout))
                except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
                    errors[_reason(exc)] += 1
                    break

        if chosen:
            await asyncio.gather(*(one(ws, i) for i, ws in enumerate(chosen)))
        return {
            "type": "echo",
            "sockets": len(chosen),
            "lat_ms": [round(v, 4) for v in latencies],
            "errors": dict(errors),
            "late": pacer.late,
            "seconds": round(time.monotonic() - pacer.start, 4),
        }

    async def serve_commands(self) -> None:
        reader = asyncio.StreamReader()
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            kind = command.get("cmd")
            if kind == "status":
                self.emit(self.status())
            elif kind == "echo":
                self.emit(
                    await self.echo(
                        int(command["count"]),
                        float(command["rate"]),
                        float(command["seconds"]),
                        int(command["size"]),
                        float(command["timeout"]),
                    )
                )
            elif kind == "stop_ramp":  # no reply: "opened" follows once in-flight ones end
                self.ramp_stopped = True
            elif kind == "quit":
                break
            else:
                self.emit({"type": "error", "message": f"unknown command {kind!r}"})
        for ws in self.sockets:
            if ws.transport is not None:
                ws.transport.abort()


async def amain(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    loop.call_later(args.max_seconds, os._exit, 3)  # the hard stop, whatever happens
    load = LoadProcess(args)
    commands = asyncio.ensure_future(load.serve_commands())
    ramp = asyncio.ensure_future(load.ramp())
    done, _ = await asyncio.wait({commands, ramp}, return_when=asyncio.FIRST_COMPLETED)
    if commands in done:  # quit or stdin closed during the ramp
        ramp.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ramp
        return
    if ramp.exception() is not None:  # not expected: open_one counts every failure
        load.emit({"type": "error", "message": repr(ramp.exception())})
        commands.cancel()
        return
    await commands


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="proxy port on 127.0.0.1")
    parser.add_argument("--count", type=int, required=True, help="WebSockets to open")
    parser.add_argument("--sources", type=lambda v: v.split(","), default=["127.0.0.1"])
    parser.add_argument("--path", default="/ws")
    parser.add_argument("--batch", type=int, default=100, help="handshakes in flight")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument("--ramp-timeout", type=float, default=300.0)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="hard self-stop")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(amain(args))
    else:
        uvloop.run(amain(args))


if __name__ == "__main__":
    main()
