"""Long-poll HTTP/1.1 load-generator process for bench/scale.py (stdlib + optional uvloop).

The same process shape and stdin/stdout JSON protocol as bench/ws_load.py (it reuses its
LoadProcess: ramp, progress, status, quit), with keep-alive HTTP/1.1 clients instead of
WebSockets:

- ramp: each client connects (bound to one of `--sources`, IP_BIND_ADDRESS_NO_PORT) and sends
  `GET /poll?hold_ms=0`; a 200 makes it "open".
- `{"cmd": "echo", "rate": R, "seconds": D, "timeout": S, ...}` runs the long-poll phase: for
  D seconds every open client sends `GET /poll?hold_ms=H` once per (open clients / R) s, at a
  random phase, with H uniform in 1000..5000 (the backend holds the response that long): R
  requests/s in all from this process, about 3 R in flight.
  The reply is `{"type": "echo", "hist": {overhead_ms_rounded_to_0.1: count}, ...}`: the
  latency the proxy added (round trip minus the backend's `X-Held-Ms`), as a histogram
  because there are up to N x 15 samples.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import cast

import ws_load
from ws_load import MAX_HEAD, LoadProcess, Pacer, _reason

HOLD_MS = (1000, 5000)


def request(hold_ms: int) -> bytes:
    return b"GET /poll?hold_ms=%d HTTP/1.1\r\nHost: bench.test\r\n\r\n" % hold_ms


class Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client; one request in flight at a time."""

    __slots__ = ("buf", "closed", "handshake", "loop", "transport", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = bytearray()
        self.closed: str | None = None
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[tuple[int, int]] = loop.create_future()
        self.waiter: asyncio.Future[tuple[int, int]] | None = self.handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(request(0))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._fail("response head too large")
            return
        lines = bytes(self.buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        length = 0
        held = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"x-held-ms":
                held = int(value)
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, held))

    def _fail(self, problem: str) -> None:
        self.closed = problem
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(problem))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            self.closed = _reason(exc) if exc is not None else "closed by peer"
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(self.closed))

    async def get(self, hold_ms: int, timeout: float) -> tuple[int, int]:
        if self.closed is not None or self.transport is None:
            raise ConnectionError(self.closed or "not connected")
        self.waiter = self.loop.create_future()
        self.transport.write(request(hold_ms))
        return await asyncio.wait_for(self.waiter, timeout)


class HttpLoadProcess(LoadProcess):
    def new_client(self) -> Client:  # type: ignore[override]
        return Client(self.loop)

    async def handshake(self, client: Client) -> None:  # type: ignore[override]
        status, _ = await client.handshake
        if status != 200:
            raise ConnectionError(f"status {status}")

    async def echo(
        self, count: int, rate: float, seconds: float, size: int, timeout: float
    ) -> dict[str, object]:
        """The long-poll phase: every open client polls once per len(clients)/rate s (at a
        random phase), so the process sends `rate` requests/s in all; a client whose answer
        comes after its next slot polls again at once (counted as late)."""
        clients = [c for c in self.sockets if c.closed is None]
        hist: Counter[float] = Counter()
        errors: Counter[str] = Counter()
        pacer = Pacer(len(clients) / rate if rate > 0 else 0.0, seconds)

        async def one(client: Client) -> None:
            async for _ in pacer.slots():
                hold = random.randint(*HOLD_MS)
                began = time.perf_counter()
                try:
                    status, held = await client.get(hold, timeout + hold / 1000)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    errors[_reason(exc)] += 1
                    break
                if status != 200:
                    errors[f"status {status}"] += 1
                else:
                    overhead = (time.perf_counter() - began) * 1000 - held
                    hist[round(max(0.0, overhead), 1)] += 1

        await asyncio.gather(*(one(c) for c in clients))  # type: ignore[arg-type]
        return {
            "type": "echo",
            "sockets": len(clients),
            "hist": {str(k): v for k, v in hist.items()},
            "lat_ms": [],
            "errors": dict(errors),
            "late": pacer.late,
            "seconds": round(time.monotonic() - pacer.start, 4),
        }


def main(argv: Sequence[str] | None = None) -> None:
    args = ws_load.parse_args(argv)
    ws_load.LoadProcess = HttpLoadProcess  # type: ignore[misc]  # amain builds this class
    try:
        import uvloop
    except ImportError:
        asyncio.run(ws_load.amain(args))
    else:
        uvloop.run(ws_load.amain(args))


if __name__ == "__main__":
    main()
