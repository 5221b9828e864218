#!/usr/bin/env python3
"""Idle-WebSocket scale benchmark: N concurrent idle WebSockets through muxproxy, HAProxy and
nginx to one hypercorn echo backend.

Usage (Linux, from the repository root, as root like bench/run.py)::

    python3 bench/ws_scale.py                        # N = 10,000 through all three proxies
    python3 bench/ws_scale.py --n 1000               # quick check
    python3 bench/ws_scale.py --only muxproxy --n 20000 --clients-per-process 5000

For every proxy a fresh hypercorn (bench/ws_echo_app.py; HTTP/1.1 upgrades and RFC 8441 over
h2c on one port, one process, pinned to `--load-cpu`) and a fresh proxy (one worker/thread,
pinned to `--proxy-cpu`) are started. After a smoke test (one WebSocket echo through the
proxy) the proxy's RSS is sampled (baseline). Then ceil(N / --clients-per-process) load
processes (bench/ws_load.py, pinned to `--load-cpu`) open N WebSockets in total, each socket
bound to one of `--sources` 127.0.0.x addresses (127.0.0.2, .3, ...), with at most `--batch`
handshakes in flight per process. Once the ramp is over and the sockets have been idle for
`--settle` seconds, it records: handshakes that succeeded (N reached) and sockets still open,
the proxy's RSS (summed VmRSS of its process tree), ESTABLISHED TCP connections to the backend
port, and the backend's own count of live WebSocket handlers. Then `--echo-sockets` randomly
chosen WebSockets send `--echo-rate` small text messages per second in total (each socket one
every echo-sockets/echo-rate seconds, at a random phase) for `--echo-seconds`, every echo is
timed, and the round-trip p50/p99 are reported.

Markdown goes to stdout (progress to stderr); Markdown and JSON also to bench/results/
(gitignored). Every process runs in its own process group and is killed on exit, failure,
Ctrl-C or SIGTERM; the load processes also stop by themselves when the harness goes away.
Only 127.0.0.0/8 is used, and runs of this script and bench/run.py never overlap (both take
the lock /tmp/muxproxy-bench.lock).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import math
import os
import platform
import queue
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from run import (
    BENCH_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    Service,
    busy_fraction,
    command_output,
    core_jiffies,
    established_to,
    exclusive_machine,
    free_port,
    loadavg,
    log,
    muxproxy_argv,
    muxproxy_version,
    render,
    tree_cpu_seconds,
    tree_pids,
    tree_rss_bytes,
)
from ws_load import echo_once

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PEAK_SAMPLE_INTERVAL_S = 1.0  # /proc/net/tcp holds ~3 N lines: sample slowly during the ramp
NOISE_THRESHOLD = 0.05  # flag when other processes used this much of the proxy CPU
LOAD_BOUND_THRESHOLD = 0.90  # flag when the load CPU (backend + load processes) was this busy


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    n: int
    clients_per_process: int
    sources: int
    batch: int
    settle: float
    echo_sockets: int
    echo_rate: float
    echo_seconds: float
    echo_size: int
    echo_timeout: float
    handshake_timeout: float
    ramp_timeout: float
    proxy_cpu: int
    load_cpu: int
    nofile: int
    nginx_workers: int  # 0 = as many as the fd limit needs
    backend_worker_class: str
    backend_scheduler: str

    @property
    def processes(self) -> int:
        return math.ceil(self.n / self.clients_per_process)

    @property
    def source_addresses(self) -> list[str]:
        return [f"127.0.0.{2 + i}" for i in range(self.sources)]

    def nginx_worker_count(self) -> int:
        if self.nginx_workers:
            return self.nginx_workers
        # 2 fds per WebSocket (client + upstream) plus slack for listeners, logs, eventfd
        return max(1, math.ceil(2 * self.n / (self.nofile - 1000)))


# --------------------------------------------------------------------------- proxies


@dataclass(frozen=True)
class WsProxySpec:
    name: str
    label: str
    template: str
    command: Callable[[Path, Path], list[str]]  # (rendered config, work dir) -> argv
    version: Callable[[], str]
    values: Callable[[Settings], dict[str, object]] = lambda settings: {}
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ready_prefix: str | None = None
    default: bool = True


def proxy_specs(python: str) -> list[WsProxySpec]:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)

    def haproxy_values(settings: Settings) -> dict[str, object]:
        return {"maxconn": settings.n + 1000, "nofile": settings.nofile}

    def nginx_values(settings: Settings) -> dict[str, object]:
        workers = settings.nginx_worker_count()
        return {
            "workers": workers,
            "nofile": settings.nofile,
            "worker_connections": settings.nofile - 100,
            "reuseport": " reuseport" if workers > 1 else "",
        }

    def haproxy_cmd(conf: Path, workdir: Path) -> list[str]:
        return ["haproxy", "-db", "-f", str(conf)]

    return [
        WsProxySpec(
            name="muxproxy",
            label="muxproxy",
            template="ws-muxproxy.toml.tmpl",
            command=lambda conf, _: muxproxy_argv(python, conf),
            version=lambda: muxproxy_version(python),
            env={"PYTHONPATH": pythonpath},
            cwd=REPO_ROOT,
            ready_prefix="ready",
        ),
        WsProxySpec(
            name="muxproxy-trio",
            label="muxproxy (trio)",
            template="ws-muxproxy.toml.tmpl",
            command=lambda conf, _: muxproxy_argv(python, conf, "trio"),
            version=lambda: muxproxy_version(python),
            env={"PYTHONPATH": pythonpath},
            cwd=REPO_ROOT,
            ready_prefix="ready",
            default=False,
        ),
        WsProxySpec(
            name="haproxy",
            label="HAProxy (ws h2)",
            template="ws-haproxy.cfg.tmpl",
            command=haproxy_cmd,
            version=lambda: command_output(["haproxy", "-v"]),
            values=haproxy_values,
        ),
        WsProxySpec(
            name="nginx",
            label="nginx (HTTP/1.1 upgrade)",
            template="ws-nginx.conf.tmpl",
            command=lambda conf, workdir: [
                "nginx",
                "-p",
                f"{workdir}/",
                "-c",
                str(conf),
                "-e",
                "stderr",
            ],
            version=lambda: command_output(["nginx", "-v"]),
            values=nginx_values,
        ),
        WsProxySpec(
            name="haproxy-reuse",
            label="HAProxy (ws h2, http-reuse always)",
            template="ws-haproxy-reuse.cfg.tmpl",
            command=haproxy_cmd,
            version=lambda: command_output(["haproxy", "-v"]),
            values=haproxy_values,
            default=False,
        ),
    ]


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    proxy: str
    n_target: int
    note: str = ""
    n_reached: int | None = None  # handshakes that got a valid 101
    handshake_failures: dict[str, int] = field(default_factory=dict)
    ramp_s: float | None = None
    open_at_measure: int | None = None  # of those, still open after the settle time
    closed_reasons: dict[str, int] = field(default_factory=dict)
    backend_conns_baseline: int | None = None
    backend_conns: int | None = None  # ESTABLISHED to the backend port, at N idle
    backend_conns_peak: int | None = None  # max over 1 s samples from baseline to the end
    backend_live_ws: int | None = None  # live WebSocket handlers according to the backend
    rss_baseline_mib: float | None = None
    rss_at_n_mib: float | None = None
    kib_per_ws: float | None = None
    rss_after_echo_mib: float | None = None
    proxy_processes: int | None = None
    proxy_max_fds: int | None = None  # open fds of the busiest process of the proxy tree, at N
    proxy_cpu_ramp_s: float | None = None
    echo_sockets: int | None = None
    echo_samples: int | None = None
    echo_errors: dict[str, int] = field(default_factory=dict)
    echo_late: int | None = None  # sends that were more than one period behind their slot
    echo_p50_ms: float | None = None
    echo_p99_ms: float | None = None
    echo_max_ms: float | None = None
    echo_seconds: float | None = None  # wall time of the echo phase (slowest load process)
    echo_msgs_per_s: float | None = None
    proxy_cpu_echo_s: float | None = None
    backend_cpu_echo_s: float | None = None
    proxy_core_others: float | None = None  # share of the proxy CPU used by others (echo)
    load_core_busy_echo: float | None = None
    open_after_echo: int | None = None
    backend_rss_at_n_mib: float | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --------------------------------------------------------------------------- /proc helpers


def tree_max_fds(root: int) -> tuple[int, int]:
    """(number of processes in the tree, open fds of the process holding the most)."""
    pids = tree_pids(root)
    most = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            most = max(most, len(os.listdir(f"/proc/{pid}/fd")))
    return len(pids), most


def rss_median(root: int, samples: int = 3, interval: float = 0.5) -> int:
    values = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        values.append(tree_rss_bytes(root))
    return sorted(values)[len(values) // 2]


class PeakConns(threading.Thread):
    """Peak ESTABLISHED connections to the backend port, sampled every `interval` seconds
    (by default from /proc/net/tcp; bench/scale.py counts with `ss` instead: /proc/net/tcp
    of a box holding 200,000 sockets takes a good part of a CPU-second to read)."""

    def __init__(
        self,
        port: int,
        count: Callable[[], int] | None = None,
        interval: float = PEAK_SAMPLE_INTERVAL_S,
    ) -> None:
        super().__init__(name="peak-conns", daemon=True)
        self.count = count or (lambda: established_to(port))
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.count())
            if self._done.wait(self.interval):
                return

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def backend_stats(port: int) -> dict[str, Any] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/stats")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        data = json.loads(body)
        return data if isinstance(data, dict) else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


# --------------------------------------------------------------------------- load processes


class LoadError(RuntimeError):
    """A load process reported a failure it cannot recover from."""


class LoadClient:
    """One bench/ws_load.py process: JSON commands on its stdin, JSON lines from its stdout."""

    def __init__(
        self,
        index: int,
        count: int,
        port: int,
        settings: Settings,
        log_path: Path,
        script: str = "ws_load.py",
    ) -> None:
        self.index = index
        self.count = count
        self.progress_open = 0
        self.progress_failed = 0
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        sources = settings.source_addresses
        rotated = sources[index % len(sources) :] + sources[: index % len(sources)]
        argv = [
            "taskset",
            "-c",
            str(settings.load_cpu),
            sys.executable,
            str(BENCH_DIR / script),
            "--port",
            str(port),
            "--count",
            str(count),
            "--sources",
            ",".join(rotated),
            "--batch",
            str(settings.batch),
            "--handshake-timeout",
            str(settings.handshake_timeout),
            "--ramp-timeout",
            str(settings.ramp_timeout),
            "--max-seconds",
            str(settings.ramp_timeout + settings.settle + 600),
        ]
        with log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, name=f"load{index}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if message.get("type") == "progress":
                    self.progress_open = message["open"]
                    self.progress_failed = message["failed"]
                else:
                    self.messages.put(message)
        self.messages.put(None)

    def send(self, command: Mapping[str, object]) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()

    def expect(self, kind: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                message = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"load process {self.index}: no {kind!r} reply in time"
                ) from None
            if message is None:
                raise RuntimeError(
                    f"load process {self.index} exited (status {self.proc.wait()}) "
                    f"before its {kind!r} reply"
                )
            if message.get("type") == kind:
                return message
            if message.get("type") == "error":
                raise LoadError(f"load process {self.index}: {message.get('message')}")

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send({"cmd": "quit"})
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_load(
    port: int, settings: Settings, workdir: Path, stack: contextlib.ExitStack
) -> list[LoadClient]:
    clients = []
    left = settings.n
    for index in range(settings.processes):
        count = min(settings.clients_per_process, left)
        left -= count
        client = LoadClient(index, count, port, settings, workdir / f"load{index}.log")
        stack.callback(client.stop)
        clients.append(client)
    return clients


# --------------------------------------------------------------------------- one proxy


class StartError(Exception):
    pass


def start_service(
    name: str,
    argv: list[str],
    workdir: Path,
    cpu: int,
    port: int,
    ready_prefix: str | None,
    stack: contextlib.ExitStack,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    if shutil.which(argv[0]) is None:
        raise StartError(f"{argv[0]} not installed")
    service = Service(name, argv, workdir / f"{name}.log", cpu=cpu, env=env, cwd=cwd)
    stack.callback(service.stop)
    problem = service.wait_ready(port, ready_prefix, START_TIMEOUT_S)
    if problem is None:
        smoke = echo_once(port)
        problem = None if smoke is None else f"smoke test (one WebSocket echo): {smoke}"
    if problem is not None:
        log(f"[{name}] failed to start: {problem}; last log lines:")
        for line in service.log_lines()[-8:]:
            log(f"    {line}")
        raise StartError(problem)
    return service


def start_backend(
    settings: Settings, workdir: Path, stack: contextlib.ExitStack
) -> tuple[Service, int]:
    port = free_port()
    conf = render(
        "ws-hypercorn.toml.tmpl",
        workdir / "ws-hypercorn.toml",
        {
            "port": port,
            "worker_class": settings.backend_worker_class,
            "max_streams": settings.n + 100,
        },
    )
    argv = [sys.executable, "-m", "hypercorn", "--config", str(conf), "ws_echo_app:app"]
    pythonpath = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p)
    service = start_service(
        "backend",
        argv,
        workdir,
        settings.load_cpu,
        port,
        None,
        stack,
        env={"PYTHONPATH": pythonpath, "WS_BENCH_H2_SCHEDULER": settings.backend_scheduler},
        cwd=BENCH_DIR,
    )
    return service, port


def wait_ramp(clients: Sequence[LoadClient], settings: Settings) -> list[dict[str, Any]]:
    deadline = time.monotonic() + settings.ramp_timeout + settings.handshake_timeout + 30
    results: list[dict[str, Any]] = []
    last_report = 0.0
    for client in clients:
        while True:
            now = time.monotonic()
            if now - last_report >= 2.0:
                last_report = now
                opened = sum(c.progress_open for c in clients)
                failed = sum(c.progress_failed for c in clients)
                log(f"    ramp: {opened} open, {failed} failed")
            try:
                results.append(client.expect("opened", min(deadline, now + 2.0)))
                break
            except LoadError:
                raise
            except RuntimeError:
                if time.monotonic() >= deadline or client.proc.poll() is not None:
                    raise
    return results


def split(total: int, weights: Sequence[int]) -> list[int]:
    """total split proportionally to weights (largest remainders)."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def bench_proxy(spec: WsProxySpec, settings: Settings, root: Path) -> Row:
    row = Row(proxy=spec.name, n_target=settings.n)
    workdir = root / spec.name
    workdir.mkdir()
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        try:
            backend, backend_port = start_backend(settings, workdir, stack)
            log(f"[{spec.name}] backend hypercorn on 127.0.0.1:{backend_port}")
            port = free_port()
            conf = render(
                spec.template,
                workdir / spec.template.removesuffix(".tmpl"),
                {"dir": workdir, "port": port, "backend_port": backend_port}
                | spec.values(settings),
            )
            log(f"[{spec.name}] starting on 127.0.0.1:{port}")
            proxy = start_service(
                "proxy",
                spec.command(conf, workdir),
                workdir,
                settings.proxy_cpu,
                port,
                spec.ready_prefix,
                stack,
                env=spec.env or None,
                cwd=spec.cwd,
            )
        except StartError as exc:
            row.note = f"failed to start ({exc})"[:300]
            return row

        if spec.name == "nginx":
            notes.append(f"{settings.nginx_worker_count()} worker(s)")
        time.sleep(1.0)
        row.backend_conns_baseline = established_to(backend_port)
        baseline = rss_median(proxy.pid)
        row.rss_baseline_mib = baseline / 2**20
        log(
            f"[{spec.name}] baseline RSS {row.rss_baseline_mib:.1f} MiB, "
            f"{row.backend_conns_baseline} backend conns; opening {settings.n} WebSockets "
            f"from {settings.processes} process(es)"
        )

        peak = PeakConns(backend_port)
        peak.start()
        stack.callback(peak.stop)
        cpu_before = tree_cpu_seconds(proxy.pid)
        clients = start_load(port, settings, workdir, stack)
        try:
            opened = wait_ramp(clients, settings)
        except RuntimeError as exc:
            row.note = f"ramp failed: {exc}"
            return row
        row.proxy_cpu_ramp_s = tree_cpu_seconds(proxy.pid) - cpu_before
        row.n_reached = sum(result["open"] for result in opened)
        row.ramp_s = max(result["seconds"] for result in opened)
        for result in opened:
            for reason, count in result["failures"].items():
                row.handshake_failures[reason] = row.handshake_failures.get(reason, 0) + count
        log(
            f"[{spec.name}] ramp done in {row.ramp_s:.1f} s: {row.n_reached} open, "
            f"failures {row.handshake_failures or 'none'}; settling {settings.settle:.0f} s"
        )
        if not proxy.alive():
            row.note = f"proxy exited (status {proxy.proc.returncode}) during the ramp"
            return row

        time.sleep(settings.settle)
        rss = rss_median(proxy.pid)
        row.rss_at_n_mib = rss / 2**20
        row.backend_conns = established_to(backend_port)
        row.proxy_processes, row.proxy_max_fds = tree_max_fds(proxy.pid)
        row.backend_rss_at_n_mib = tree_rss_bytes(backend.pid) / 2**20
        deadline = time.monotonic() + 30
        for client in clients:
            client.send({"cmd": "status"})
        statuses = [client.expect("status", deadline) for client in clients]
        row.open_at_measure = sum(s["open"] for s in statuses)
        for status in statuses:
            for reason, count in status["closed_reasons"].items():
                row.closed_reasons[reason] = row.closed_reasons.get(reason, 0) + count
        stats = backend_stats(backend_port)
        row.backend_live_ws = None if stats is None else int(stats["live"])
        if row.open_at_measure:
            row.kib_per_ws = (rss - baseline) / row.open_at_measure / 1024
        log(
            f"[{spec.name}] at N: {row.open_at_measure} open, RSS {row.rss_at_n_mib:.1f} MiB "
            f"({_num(row.kib_per_ws, '.2f')} KiB/WS), {row.backend_conns} backend conns, "
            f"backend sees {row.backend_live_ws} live WebSockets"
        )

        # echo round trips under load
        if row.open_at_measure:
            shares = split(
                min(settings.echo_sockets, row.open_at_measure), [s["open"] for s in statuses]
            )
            cpu_before = tree_cpu_seconds(proxy.pid)
            backend_cpu_before = tree_cpu_seconds(backend.pid)
            proxy_core_before = core_jiffies(settings.proxy_cpu)
            load_core_before = core_jiffies(settings.load_cpu)
            wall_before = time.monotonic()
            for client, share in zip(clients, shares, strict=True):
                client.send(
                    {
                        "cmd": "echo",
                        "count": share,
                        "rate": settings.echo_rate * share / max(1, sum(shares)),
                        "seconds": settings.echo_seconds,
                        "size": settings.echo_size,
                        "timeout": settings.echo_timeout,
                    }
                )
            deadline = time.monotonic() + settings.echo_seconds + settings.echo_timeout + 60
            echoes = [client.expect("echo", deadline) for client in clients]
            wall = time.monotonic() - wall_before
            cpu = tree_cpu_seconds(proxy.pid) - cpu_before
            row.proxy_cpu_echo_s = cpu
            row.backend_cpu_echo_s = tree_cpu_seconds(backend.pid) - backend_cpu_before
            proxy_busy = busy_fraction(proxy_core_before, core_jiffies(settings.proxy_cpu))
            row.proxy_core_others = max(0.0, proxy_busy - cpu / wall)
            row.load_core_busy_echo = busy_fraction(
                load_core_before, core_jiffies(settings.load_cpu)
            )
            latencies = [v for echo in echoes for v in echo["lat_ms"]]
            row.echo_sockets = sum(echo["sockets"] for echo in echoes)
            row.echo_samples = len(latencies)
            row.echo_seconds = max(echo["seconds"] for echo in echoes)
            row.echo_late = sum(echo["late"] for echo in echoes)
            for echo in echoes:
                for reason, count in echo["errors"].items():
                    row.echo_errors[reason] = row.echo_errors.get(reason, 0) + count
            if latencies:
                row.echo_p50_ms = percentile(latencies, 0.50)
                row.echo_p99_ms = percentile(latencies, 0.99)
                row.echo_max_ms = max(latencies)
                row.echo_msgs_per_s = len(latencies) / row.echo_seconds
            row.rss_after_echo_mib = tree_rss_bytes(proxy.pid) / 2**20
            deadline = time.monotonic() + 30
            for client in clients:
                client.send({"cmd": "status"})
            row.open_after_echo = sum(
                client.expect("status", deadline)["open"] for client in clients
            )
            log(
                f"[{spec.name}] echo: {row.echo_samples} round trips on {row.echo_sockets} "
                f"WebSockets in {row.echo_seconds:.2f} s, p50 {_num(row.echo_p50_ms, '.2f')} ms, "
                f"p99 {_num(row.echo_p99_ms, '.2f')} ms, errors {row.echo_errors or 'none'}"
            )
        row.backend_conns_peak = peak.stop()
        if not proxy.alive():
            notes.append(f"proxy exited (status {proxy.proc.returncode})")
        row.note = "; ".join(notes + auto_notes(row, settings))
    return row


def auto_notes(row: Row, settings: Settings) -> list[str]:
    notes = []
    if row.handshake_failures:
        failures = ", ".join(f"{k} x{v}" for k, v in sorted(row.handshake_failures.items()))
        notes.append(f"handshake failures: {failures}")
    if row.n_reached is not None and row.open_at_measure is not None:
        lost = row.n_reached - row.open_at_measure
        if lost:
            notes.append(f"{lost} closed while idle ({row.closed_reasons})")
    if row.backend_live_ws is not None and row.backend_live_ws != row.open_at_measure:
        notes.append(f"backend has {row.backend_live_ws} live WebSockets")
    if row.proxy_max_fds is not None and row.proxy_max_fds >= settings.nofile - 50:
        notes.append(f"proxy at the {settings.nofile}-fd limit ({row.proxy_max_fds} open)")
    if row.echo_errors:
        notes.append(f"echo errors: {row.echo_errors}")
    if row.echo_late:
        notes.append(f"{row.echo_late} echo sends more than one period late")
    if row.open_after_echo is not None and row.open_at_measure is not None:
        lost = row.open_at_measure - row.open_after_echo
        if lost:
            notes.append(f"{lost} closed during the echo phase")
    if row.load_core_busy_echo is not None and row.load_core_busy_echo > LOAD_BOUND_THRESHOLD:
        notes.append(
            f"load CPU {settings.load_cpu} {row.load_core_busy_echo:.0%} busy during the echo "
            f"phase (backend {row.backend_cpu_echo_s or 0:.1f} CPU-s): latency partly load-bound"
        )
    if row.proxy_core_others is not None and row.proxy_core_others > NOISE_THRESHOLD:
        notes.append(
            f"{row.proxy_core_others:.0%} of CPU {settings.proxy_cpu} used by other processes "
            "during the echo phase"
        )
    return notes


# --------------------------------------------------------------------------- reporting


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(rows: Sequence[Row], labels: Mapping[str, str]) -> str:
    columns: list[tuple[str, Callable[[Row], str]]] = [
        ("Proxy", lambda row: labels.get(row.proxy, row.proxy)),
        ("N target", lambda row: f"{row.n_target:,}"),
        ("N reached", lambda row: _num(row.n_reached, ",d")),
        ("Open at measure", lambda row: _num(row.open_at_measure, ",d")),
        ("Backend conns", lambda row: _num(row.backend_conns, ",d")),
        ("RSS baseline MiB", lambda row: _num(row.rss_baseline_mib, ".1f")),
        ("RSS at N MiB", lambda row: _num(row.rss_at_n_mib, ".1f")),
        ("KiB per WS", lambda row: _num(row.kib_per_ws, ".2f")),
        ("Echo p50 ms", lambda row: _num(row.echo_p50_ms, ".2f")),
        ("Echo p99 ms", lambda row: _num(row.echo_p99_ms, ".2f")),
        ("Notes", lambda row: row.note.replace("|", "/")),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_facts(specs: Sequence[WsProxySpec], settings: Settings) -> dict[str, Any]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        match = re.search(
            r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE
        )
        cpu_model = match.group(1) if match else "?"
    versions = {
        "backend": "hypercorn "
        + importlib.metadata.version("hypercorn")
        + f" ({settings.backend_worker_class} worker, {settings.backend_scheduler} h2 "
        "scheduler), h2 " + importlib.metadata.version("h2"),
        **{spec.name: spec.version() for spec in specs},
    }
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": loadavg(),
        "python": platform.python_version(),
        "nofile": [soft, hard],
        "ip_local_port_range": Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split(),
        "versions": versions,
        "settings": asdict(settings),
    }


def facts_markdown(facts: Mapping[str, Any], settings: Settings) -> str:
    lines = [
        f"## muxproxy idle-WebSocket scale benchmark, {facts['date']}",
        "",
        f"- machine: nproc={facts['nproc']}, {facts['cpu_model']}, {facts['kernel']}, "
        f"load average at start {' '.join(facts['loadavg_at_start'])}, "
        f"open files limit {facts['nofile'][0]} (hard {facts['nofile'][1]}) per process",
        f"- pinning: proxy on CPU {settings.proxy_cpu}; hypercorn backend, load processes and "
        f"this harness on CPU {settings.load_cpu}",
        f"- load: N = {settings.n:,} WebSockets from {settings.processes} process(es) "
        f"(<= {settings.clients_per_process:,} each), sources "
        f"{', '.join(settings.source_addresses)}, <= {settings.batch} handshakes in flight per "
        f"process; measured after {settings.settle:g} s idle; echo: {settings.echo_sockets:,} "
        f"random WebSockets send {settings.echo_rate:g} {settings.echo_size}-byte messages/s "
        f"in total (each one every {settings.echo_sockets / settings.echo_rate:g} s) for "
        f"{settings.echo_seconds:g} s, every echo timed",
    ]
    lines += [f"- {name}: {version}" for name, version in facts["versions"].items()]
    return "\n".join(lines)


def write_results(facts: Mapping[str, Any], rows: Sequence[Row], markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = RESULTS_DIR / f"ws-scale-{stamp}.json"
    payload = {"facts": facts, "rows": [asdict(row) for row in rows]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS_DIR / f"ws-scale-{stamp}.md").write_text(markdown + "\n")
    return json_path


# --------------------------------------------------------------------------- main


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None, specs: Sequence[WsProxySpec]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Idle-WebSocket scale: N WebSockets through muxproxy, HAProxy and nginx."
    )
    names = [spec.name for spec in specs]
    parser.add_argument("--n", type=int, default=10_000, help="WebSockets to open (10000)")
    parser.add_argument(
        "--only",
        type=_csv,
        default=[spec.name for spec in specs if spec.default],
        help=f"proxies to run, among {','.join(names)} (default: all but haproxy-reuse)",
    )
    parser.add_argument(
        "--clients-per-process", type=int, default=5000, help="WebSockets per load process (5000)"
    )
    parser.add_argument("--sources", type=int, default=4, help="127.0.0.2.. addresses (4)")
    parser.add_argument("--batch", type=int, default=100, help="handshakes in flight (100)")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="idle seconds before measuring (5)"
    )
    parser.add_argument(
        "--echo-sockets", type=int, default=1000, help="WebSockets that echo (1000)"
    )
    parser.add_argument("--echo-rate", type=float, default=1000, help="messages/s in all (1000)")
    parser.add_argument("--echo-seconds", type=float, default=10, help="echo phase (10)")
    parser.add_argument("--echo-size", type=int, default=32, help="message bytes (32)")
    parser.add_argument("--echo-timeout", type=float, default=10.0, help="per round trip, s (10)")
    parser.add_argument("--handshake-timeout", type=float, default=30.0, help="s (30)")
    parser.add_argument(
        "--ramp-timeout", type=float, default=300.0, help="s, per load process (300)"
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for the rest (1)")
    parser.add_argument(
        "--nginx-workers", type=int, default=0, help="0 = as many as 2 fds per WS need (0)"
    )
    parser.add_argument("--backend-worker-class", default="uvloop", help="hypercorn (uvloop)")
    parser.add_argument(
        "--backend-scheduler",
        choices=("roundrobin", "stock"),
        default="roundrobin",
        help="hypercorn's h2 send scheduler: ws_echo_app.py's O(1) round robin or the stock "
        "`priority` tree (O(streams) per frame; see ws_echo_app.py) (roundrobin)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for muxproxy")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown proxy: {', '.join(unknown)}")
    if args.n < 1 or args.clients_per_process < 1 or args.sources < 1 or args.batch < 1:
        parser.error("--n, --clients-per-process, --sources and --batch must be >= 1")
    if args.sources > 250:
        parser.error("--sources: at most 250 (127.0.0.2 .. 127.0.0.251)")
    cpus = os.sched_getaffinity(0)
    if not {args.proxy_cpu, args.load_cpu} <= cpus:
        parser.error(f"--proxy-cpu/--load-cpu must be among the usable CPUs {sorted(cpus)}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(specs: Sequence[WsProxySpec], settings: Settings, keep_tmp: bool) -> int:
    facts = machine_facts(specs, settings)
    header = facts_markdown(facts, settings)
    print(header + "\n", flush=True)
    rows: list[Row] = []
    status = 0
    workdir = Path(tempfile.mkdtemp(prefix="muxproxy-ws-bench-"))
    try:
        for spec in specs:
            rows.append(bench_proxy(spec, settings, workdir))
            log(f"[{spec.name}] done: {rows[-1].note or 'ok'}")
    except KeyboardInterrupt:
        status = 130
        log("interrupted; all started processes were stopped")
    finally:
        if keep_tmp:
            log(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_at_end"] = loadavg()
    table = markdown_table(rows, {spec.name: spec.label for spec in specs})
    table += f"\n\nLoad average at end: {' '.join(loadavg())}."
    if status:
        table += " Interrupted: partial results."
    print(table, flush=True)
    json_path = write_results(facts, rows, header + "\n\n" + table)
    log(f"results written to {json_path} (and .md)")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, proxy_specs(sys.executable))
    specs = [spec for spec in proxy_specs(args.python) if spec.name in args.only]
    # Every child inherits the soft fd limit; raise it to the hard limit (raising the hard
    # limit itself needs CAP_SYS_RESOURCE, which this box does not grant even to root).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    settings = Settings(
        n=args.n,
        clients_per_process=args.clients_per_process,
        sources=args.sources,
        batch=args.batch,
        settle=args.settle,
        echo_sockets=args.echo_sockets,
        echo_rate=args.echo_rate,
        echo_seconds=args.echo_seconds,
        echo_size=args.echo_size,
        echo_timeout=args.echo_timeout,
        handshake_timeout=args.handshake_timeout,
        ramp_timeout=args.ramp_timeout,
        proxy_cpu=args.proxy_cpu,
        load_cpu=args.load_cpu,
        nofile=hard,
        nginx_workers=args.nginx_workers,
        backend_worker_class=args.backend_worker_class,
        backend_scheduler=args.backend_scheduler,
    )
    if settings.clients_per_process > hard - 100:
        log(f"--clients-per-process must stay below the {hard}-fd limit per process")
        return 2
    missing = [tool for tool in ("taskset",) if shutil.which(tool) is None]
    if missing:
        log(f"missing required tools: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.sched_setaffinity(0, {settings.load_cpu})  # keep the harness off the proxy's CPU
    try:
        with exclusive_machine():
            random.seed()
            return run(specs, settings, args.keep_tmp)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
