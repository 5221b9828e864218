"""Soak run (not a test): mixed load through muxproxy while its backends restart and drain.

    python3 bench/soak.py --minutes 30            # the full run (README "Soak")
    python3 bench/soak.py --minutes 3             # a short check that the harness works

muxproxy runs as a subprocess (``muxproxy run``, asyncio) in front of two clusters:

* ``h2``: two h2c origins (muxproxy's demo H2Origin with the integration tests' WebSocket
  script).  Every ``--restart-every`` seconds one of them (in turn) is stopped abruptly and
  started again on the same port; each sends GOAWAY after ``--goaway-after`` streams per
  connection.
* ``h3``: one aioquic HTTP/3 origin (the integration tests' H3Origin), GOAWAY after
  ``--goaway-after`` streams per connection.  (It is not restarted: it binds a new UDP port
  each time it starts.)

The load, all HTTP/1.1 clients of the proxy, each request tagged with a unique
``x-request-id``: keep-alive GETs, uploads (POST /echo, 64 KiB, echo checked), slow readers
(GET /big of 1 MiB read at 256 KiB/s), WebSocket echoes (RFC 6455 over the h2 cluster,
RFC 8441), and GET/POST over the h3 cluster.

It reports, from what the origins recorded (the ids of the requests they processed):

* requests processed twice (must be 0);
* failures a replay could have saved: a client got no answer or a 5xx for a request no origin
  processed (must be 0); other failures (processed, then cut by a restart) are counted apart;
* the proxy's RSS and open descriptors every ``--sample-every`` seconds, and whether both
  are flat after the warm-up (the first fifth of the run): each minute's median within ±10 %
  of the mean of those medians.  Medians, not single samples: a sample taken while a
  restarting backend's connections are being replaced sees a few descriptors come and go
  (47–60 around 51 in the 30-minute run), which is no leak; a leak moves the medians;
* WebSocket failures that are not a plain cut (a timeout, not a close), each with the
  backend that carried it and when it began relative to that backend's restart.

Everything stays on 127.0.0.1; the run stops by itself.  Exit status 0 when the three
criteria hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import trustme
import wsproto
import wsproto.events

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from muxproxy.demo.h2server import H2Origin, OriginRequest  # noqa: E402
from tests.integration.h3origin import H3Origin, _Conn  # noqa: E402
from tests.integration.ws_origin import WSScript  # noqa: E402

UPLOAD = 64 * 1024
BIG = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- origins that record what they processed ------------------------------------------------


@dataclass
class Ledger:
    processed: Counter[str] = field(default_factory=Counter)
    backend: dict[str, int] = field(default_factory=dict)  # WebSocket id -> h2 origin index

    def record(self, rid: bytes | None, backend: int | None = None) -> None:
        if rid:
            self.processed[rid.decode()] += 1
            if backend is not None and rid.startswith(b"ws-"):
                self.backend[rid.decode()] = backend


class RecordingScript(WSScript):
    def __init__(self, ledger: Ledger, backend: int | None = None) -> None:
        super().__init__()
        self.ledger = ledger
        self.backend = backend

    async def __call__(self, req: OriginRequest) -> None:
        self.ledger.record(req.header(b"x-request-id"), self.backend)
        await super().__call__(req)


class RestartableH2(H2Origin):
    """Once draining, connections are closed as they are accepted (a restarting server has
    closed its listening socket; nothing can be sent on them)."""

    draining = False

    async def _accept(self, stream: anyio.abc.ByteStream) -> None:
        if self.draining:
            await stream.aclose()
            return
        await super()._accept(stream)


class RecordingH3(H3Origin):
    ledger: Ledger

    def _answer(self, conn: _Conn, sid: int) -> None:
        self.ledger.record(conn.streams[sid].headers.get(b"x-request-id"))
        super()._answer(conn, sid)


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> what happened
    # (monotonic time, h2 origin index) of each restart's beginning (GOAWAY, or the drop)
    restarts: list[tuple[float, int]] = field(default_factory=list)
    # WebSocket id -> (the failed step's start, its end), for the report's classification
    ws_windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    ids = 0

    def when(self, t: float) -> str:
        """``t`` (monotonic) relative to the backend restarts, for a failure's description."""
        before = [r for r in self.restarts if r[0] <= t]
        after = [r for r in self.restarts if r[0] > t]
        where = (
            f"{t - before[-1][0]:.1f} s after backend {before[-1][1]}'s restart began"
            if before
            else "before any restart"
        )
        if after:
            where += f", {after[0][0] - t:.1f} s before backend {after[0][1]}'s"
        return where

    def next_id(self, kind: str) -> str:
        self.ids += 1
        return f"{kind}-{self.ids}"


class Client:
    """One keep-alive HTTP/1.1 connection to the proxy (h11)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: anyio.abc.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        target: str,
        host: str,
        rid: str,
        body: bytes = b"",
        read_rate: int = 0,
    ) -> tuple[int, bytes]:
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            await self.close()
            self.stream = await anyio.connect_tcp("127.0.0.1", self.port)
            self.conn = h11.Connection(h11.CLIENT)
        headers = [("host", host), ("x-request-id", rid)]
        if body:
            headers.append(("content-length", str(len(body))))
        out = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        await self.stream.send(out)
        status, parts = 0, []
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                data = await self.stream.receive(65536)
                if read_rate:
                    await anyio.sleep(len(data) / read_rate)  # a slow reader, on purpose
                self.conn.receive_data(data)
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                parts.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                if self.conn.our_state is h11.MUST_CLOSE:
                    await self.close()
                else:
                    self.conn.start_next_cycle()
                return status, b"".join(parts)
            elif isinstance(ev, h11.ConnectionClosed):
                raise ConnectionError("closed before the response ended")

    async def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(Exception):
                await self.stream.aclose()
        self.stream = None


async def worker(kind: str, port: int, tally: Tally, stop: anyio.Event, rng: random.Random) -> None:
    client = Client(port)
    payload = rng.randbytes(UPLOAD)
    while not stop.is_set():
        rid = tally.next_id(kind)
        try:
            with anyio.fail_after(60):
                if kind == "get":
                    status, body = await client.request("GET", "/hello", "h2.test", rid)
                    good = status == 200 and body == b"hello\n"
                elif kind == "upload":
                    status, body = await client.request("POST", "/echo", "h2.test", rid, payload)
                    good = status == 200 and body == payload
                elif kind == "slow":
                    status, body = await client.request(
                        "GET", f"/big?{BIG}", "h2.test", rid, read_rate=256 * 1024
                    )
                    good = status == 200 and len(body) == BIG
                elif kind == "h3get":
                    status, body = await client.request("GET", "/hello", "h3.test", rid)
                    good = status == 200 and body == b"hello\n"
                else:  # h3post
                    status, body = await client.request("POST", "/echo", "h3.test", rid, payload)
                    good = status == 200 and body == payload
            if good:
                tally.ok[kind] += 1
            else:
                tally.failed[rid] = f"{status} {body[:80]!r}"
        except Exception as exc:
            tally.failed[rid] = f"{type(exc).__name__}: {exc}"
            await client.close()
    await client.close()


async def websocket_worker(port: int, tally: Tally, stop: anyio.Event) -> None:
    """A WebSocket that echoes a message every 100 ms; reopened when a restart cuts it."""
    while not stop.is_set():
        rid = tally.next_id("ws")
        phase, began = "connecting", time.monotonic()
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send(
                ws.send(
                    wsproto.events.Request(
                        host="h2.test",
                        target="/ws",
                        extra_headers=[(b"x-request-id", rid.encode())],
                    )
                )
            )
            n = 0
            phase = "opening"  # (began: the handshake is sent right after connecting)
            async with stream:
                accepted = False
                with anyio.fail_after(30):
                    while not accepted:
                        ws.receive_data(await stream.receive(65536))
                        for ev in ws.events():
                            if isinstance(ev, wsproto.events.AcceptConnection):
                                accepted = True
                            elif isinstance(ev, wsproto.events.RejectConnection):
                                raise ValueError(f"WebSocket refused ({ev.status_code})")
                while not stop.is_set():
                    phase, began = f"echo {n}", time.monotonic()
                    text = f"{rid} message {n}"
                    await stream.send(ws.send(wsproto.events.TextMessage(data=text)))
                    echoed = None
                    parts: list[str] = []  # (wsproto hands out a message split across reads)
                    with anyio.fail_after(30):
                        while echoed is None:
                            data = await stream.receive(65536)
                            ws.receive_data(data)
                            for ev in ws.events():
                                if isinstance(ev, wsproto.events.TextMessage):
                                    parts.append(ev.data)
                                    if ev.message_finished:
                                        echoed = "".join(parts)
                                elif isinstance(ev, wsproto.events.CloseConnection):
                                    raise ConnectionError("closed")
                    if echoed != text:
                        raise ValueError(f"echo {echoed!r} for {text!r}")
                    tally.ok["ws-message"] += 1
                    n += 1
                    await anyio.sleep(0.1)
        except Exception as exc:
            # A WebSocket cut by a backend restart is expected (a tunnel cannot be replayed).
            if isinstance(exc, anyio.EndOfStream | anyio.BrokenResourceError | ConnectionError):
                tally.ok["ws-cut-by-restart"] += 1
            else:
                tally.failed[rid] = (
                    f"{type(exc).__name__} in {phase}, begun {tally.when(began)}: {exc}"
                )
                tally.ws_windows[rid] = (began, time.monotonic())


# --- the proxy process --------------------------------------------------------------------------


def proxy_config(port: int, h2_ports: list[int], h3_port: int, ca: Path) -> str:
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in h2_ports)
    return f"""
[[listeners]]
name = "edge"
listen = "127.0.0.1:{port}"

[[clusters]]
name = "h2"
protocol = "h2c"
backends = [{backends}]
connections = 2
max_replays = 4

[[clusters]]
name = "h3"
protocol = "h3"
backends = ["127.0.0.1:{h3_port}"]
connections = 2
max_replays = 4
connect_timeout = "10s"
tls = {{ verify = true, ca = "{ca}", server_name = "localhost" }}

[[routes]]
host = "h3.test"
cluster = "h3"

[[routes]]
host = "*"
cluster = "h2"
websocket = true
"""


async def control(
    args: argparse.Namespace,
    pid: int,
    tally: Tally,
    samples: list[tuple[float, int, int]],
    origins: list[RestartableH2],
    scopes: list[anyio.CancelScope],
    restart: Any,
) -> int:
    """Sample the proxy and restart backends until the time is up; the number of restarts."""
    start = time.monotonic()
    end = start + args.minutes * 60
    next_restart = start + args.restart_every
    next_sample = start
    which = restarts = 0
    while (now := time.monotonic()) < end:
        if now >= next_sample:
            rss, fds = sample(pid)
            samples.append((now - start, rss, fds))
            print(
                f"{now - start:7.0f} s  rss {rss / 2**20:7.1f} MiB  fds {fds:5d}  "
                f"ok {sum(tally.ok.values()):8d}  failed {len(tally.failed):5d}  "
                f"restarts {restarts}",
                file=sys.stderr,
            )
            next_sample += args.sample_every
        if now >= next_restart:
            tally.restarts.append((now, which))
            if not args.abrupt:
                await drain(origins[which], args.drain_limit)
            for conn in list(origins[which].connections):  # what is left (WebSockets)
                await conn.abort()  # closed, so the proxy sees it at once
            scopes[which].cancel()
            await anyio.sleep(0.5)
            await restart(which)
            restarts += 1
            which = 1 - which
            next_restart += args.restart_every
        await anyio.sleep(1)
    return restarts


async def drain(origin: RestartableH2, limit: float) -> None:
    """A graceful restart, as nginx's: GOAWAY on every connection (and on any the proxy opens
    meanwhile), then wait for the streams below it to finish, at most ``limit`` seconds."""
    origin.draining = True
    with anyio.move_on_after(limit):
        while origin.connections:
            for conn in list(origin.connections):
                if conn.last_stream_id is None and not conn.closed:
                    conn.goaway()
                    origin.spawn(conn.flush)
            await anyio.sleep(0.05)


def sample(pid: int) -> tuple[int, int]:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def minute_medians(samples: list[tuple[float, int]]) -> list[float]:
    """The median of each minute's samples ((seconds into the run, value) pairs)."""
    minutes: dict[int, list[int]] = {}
    for t, v in samples:
        minutes.setdefault(int(t // 60), []).append(v)
    return [statistics.median(vs) for _, vs in sorted(minutes.items())]


def flat(medians: list[float]) -> bool:
    """Every minute's median within ±10 % of their mean: no trend, whatever single samples
    taken mid-restart show."""
    if not medians:
        return False
    mean = sum(medians) / len(medians)
    return all(abs(v - mean) <= 0.1 * mean for v in medians)


async def soak(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="muxproxy-soak-"))
    ca = trustme.CA()
    ca_path = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    ledger = Ledger()
    tally = Tally()
    stop = anyio.Event()
    h2_ports = [free_port(), free_port()]
    proxy_port = free_port()
    samples: list[tuple[float, int, int]] = []
    restarts = 0

    async with anyio.create_task_group() as tg:
        scopes: list[anyio.CancelScope] = []

        origins: list[RestartableH2] = []

        async def run_h2(i: int, *, task_status: anyio.abc.TaskStatus[int]) -> None:
            origin = RestartableH2(
                RecordingScript(ledger, i), goaway_after=args.goaway_after, connect_protocol=True
            )
            origins[i] = origin
            with anyio.CancelScope() as scope:
                scopes[i] = scope
                await origin.serve(port=h2_ports[i], task_status=task_status)

        scopes.extend([anyio.CancelScope(), anyio.CancelScope()])
        origins.extend([RestartableH2(RecordingScript(ledger))] * 2)  # replaced as each starts
        for i in range(2):
            await tg.start(run_h2, i)
        h3 = RecordingH3(ca, tmp, goaway_after=args.goaway_after)
        h3.ledger = ledger
        h3_port = await tg.start(h3.serve)

        conf = tmp / "muxproxy.toml"
        conf.write_text(proxy_config(proxy_port, h2_ports, h3_port, ca_path))
        proc = subprocess.Popen(
            [sys.executable, "-m", "muxproxy", "run", "-c", str(conf), "--loop", "asyncio"],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "proxy.log").open("wb"),
            start_new_session=True,
        )
        try:
            with anyio.move_on_after(30):  # its one "ready" line (stderr, as `muxproxy run`)
                while b"\nready " not in b"\n" + (tmp / "proxy.log").read_bytes():
                    if proc.poll() is not None:
                        break
                    await anyio.sleep(0.1)
            if b"\nready " not in b"\n" + (tmp / "proxy.log").read_bytes():
                print(f"muxproxy did not start; see {tmp}/proxy.log", file=sys.stderr)
                return 1
            rng = random.Random(20261204)
            # The load in a task group of its own: once ``stop`` is set, each worker finishes
            # its request in flight, and the group ends before the proxy is stopped.
            async with anyio.create_task_group() as load:
                for kind, count in (
                    ("get", args.clients),
                    ("upload", max(1, args.clients // 4)),
                    ("slow", 2),
                    ("h3get", max(1, args.clients // 4)),
                    ("h3post", max(1, args.clients // 8)),
                ):
                    for _ in range(count):
                        load.start_soon(
                            worker, kind, proxy_port, tally, stop, random.Random(rng.random())
                        )
                for _ in range(args.websockets):
                    load.start_soon(websocket_worker, proxy_port, tally, stop)
                restarts = await control(
                    args, proc.pid, tally, samples, origins, scopes, lambda i: tg.start(run_h2, i)
                )
                stop.set()
        finally:
            proc.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(proc.wait)
            tg.cancel_scope.cancel()

    twice = {rid: n for rid, n in ledger.processed.items() if n > 1}
    # (a WebSocket counts too: its extended CONNECT is replayed like any request until an
    # origin processes it; once processed, its loss is a tunnel's, never savable)
    savable = {rid: why for rid, why in tally.failed.items() if rid not in ledger.processed}
    cut = len(tally.failed) - len(savable)
    warm = [s for s in samples if s[0] >= args.minutes * 60 / 5]
    rss_medians = minute_medians([(s[0], s[1]) for s in warm])
    fds_medians = minute_medians([(s[0], s[2]) for s in warm])
    rss_flat = flat(rss_medians)
    fds_flat = flat(fds_medians)
    # A WebSocket timeout is a tunnel loss when its backend restarted while it waited (from
    # GOAWAY to the drop, a tunnel on a dying backend connection cannot be saved by a replay);
    # one on a backend that stayed up is a stall to look into
    ws_timeouts = {rid: w for rid, w in tally.ws_windows.items() if rid in tally.failed}
    ws_on_restart = {
        rid
        for rid, (began, ended) in ws_timeouts.items()
        if any(
            b == ledger.backend.get(rid) and began - args.drain_limit - 1 <= t <= ended
            for t, b in tally.restarts
        )
    }
    report = {
        "minutes": args.minutes,
        "responses_ok": dict(tally.ok),
        "restarts": restarts,
        "processed_twice": len(twice),
        "failures_a_replay_could_have_saved": len(savable),
        "other_failures": cut,
        "rss_mib_after_warmup": [round(s[1] / 2**20, 1) for s in warm],
        "fds_after_warmup": [s[2] for s in warm],
        "rss_mib_minute_medians": [round(v / 2**20, 1) for v in rss_medians],
        "fds_minute_medians": fds_medians,
        "websocket_timeouts": len(ws_timeouts),
        "websocket_timeouts_on_a_restarting_backend": len(ws_on_restart),
        "websocket_timeouts_never_processed": sum(
            rid not in ledger.processed for rid in ws_timeouts
        ),
        "rss_flat_10pct_minute_medians": rss_flat,
        "fds_flat_10pct_minute_medians": fds_flat,
        "examples": {
            "twice": list(twice)[:5],
            "savable": list(savable.items())[:5],
            "failed": list(tally.failed.items())[:5],
            "websocket_timeouts": [(rid, tally.failed[rid]) for rid in ws_timeouts][:20],
        },
    }
    print(json.dumps(report, indent=2))
    return 0 if not twice and not savable and rss_flat and fds_flat else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--clients", type=int, default=16, help="keep-alive GET clients")
    p.add_argument("--websockets", type=int, default=8)
    p.add_argument("--restart-every", type=float, default=60, help="seconds")
    p.add_argument("--goaway-after", type=int, default=3000, help="streams per connection")
    p.add_argument("--sample-every", type=float, default=10, help="seconds")
    p.add_argument(
        "--drain-limit",
        type=float,
        default=10,
        help="seconds a restarting backend lets its streams finish after GOAWAY",
    )
    p.add_argument(
        "--abrupt",
        action="store_true",
        help="restart by dropping connections, no GOAWAY (failures then include "
        "requests the proxy cannot know were unprocessed)",
    )
    args = p.parse_args()
    sys.exit(anyio.run(soak, args))


if __name__ == "__main__":
    main()
