#!/usr/bin/env python3
"""Workers (issue 17.4): how SO_REUSEPORT spreads requests, and what a second worker adds.

Usage (Linux, from the repository root, as root like bench/run.py)::

    python3 bench/workers.py                       # workers 1 and 2, wrk -c64 and -c512, /small
    python3 bench/workers.py --connections 512 --duration 5
    python3 bench/workers.py --worker-quota 45     # each worker capped at 45 % of a core

For each worker count and client count, a fresh muxproxy (`workers = N`, uvloop, an h2c pool
of 2 connections per worker, `[admin]` on a free port) in front of bench/run.py's nginx h2c
backend, loaded by `wrk -t1`. Nothing is pinned (the OS places the workers, wrk and the
backend on both CPUs), so one worker and two workers run on the same box under the same
rules. Per cell:

- **balance**: each worker's `muxproxy_requests_total` (the supervisor's `/metrics` labels
  every sample `worker="N"`), read before and after the measured window; the share of each
  worker and the largest deviation from an even share;
- requests per second, and its ratio to one worker's at the same client count;
- CPU seconds per second of the proxy (all workers and the supervisor) and of the load side
  (wrk + backend nginx), from `/proc`. On a 2-core box the load side takes its share of the
  same two cores, so two workers cannot double one worker's rate here; the load CPU column
  says how much of the box the load side used.

`--worker-quota PCT` leaves room for the load instead: once the proxy is ready, each worker
process (the supervisor's `--worker` children; with one worker, the process itself) is moved
into its own cgroup v1 CPU group capped at PCT % of one core (bench/run.py's CpuQuota, the one
`--proxy-quota` uses), so N workers get at most N x PCT % of a core between them and wrk +
nginx get the rest of the two cores, uncapped. The supervisor stays outside (it only answers
`/metrics`). 1 worker at PCT against 2 workers at PCT each then says whether SO_REUSEPORT
workers scale, with the load side never the limit (its column should stay well below what the
box has left). The table adds the workers' CPU as a share of their quotas (about 100 %:
saturated) and the CFS periods in which a worker was throttled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from run import (
    REPO_ROOT,
    CpuQuota,
    Service,
    Settings,
    _csv,
    _interrupt,
    exclusive_machine,
    free_port,
    loadavg,
    log,
    muxproxy_argv,
    muxproxy_version,
    quota_problem,
    quota_share,
    run_wrk,
    smoke_test,
    start_backend,
    tree_cpu_seconds,
    tree_pids,
)

ALL = "0-1"  # taskset list: both CPUs
CONFIG = """\
[proxy]
workers = {workers}
loop = "uvloop"
access_log = "off"

[admin]
listen = "127.0.0.1:{admin}"

[[listeners]]
name = "edge"
listen = "127.0.0.1:{port}"

[[clusters]]
name = "app"
protocol = "h2c"
backends = ["127.0.0.1:{backend_port}"]
connections = 2

[[routes]]
host = "*"
path_prefix = "/"
cluster = "app"
"""
SAMPLE = re.compile(r'^muxproxy_requests_total\{worker="(\d+)",[^}]*\} (\d+)', re.MULTILINE)


@dataclass
class Cell:
    workers: int
    connections: int
    rps: float = 0.0
    errors: int = 0
    p99_ms: float = 0.0
    per_worker: dict[int, int] = field(default_factory=dict)
    proxy_cpu: float = 0.0  # CPU-seconds per second, all workers and the supervisor
    worker_cpu: float = 0.0  # the workers only (--worker-quota)
    quota_share: float | None = None  # worker_cpu / (workers x quota)
    throttled: int = 0  # CFS periods in which a worker hit its quota, summed over workers
    periods: int = 0  # ... out of the periods in which a worker ran
    load_cpu: float = 0.0  # wrk + backend nginx
    note: str = ""

    @property
    def imbalance(self) -> float:
        """Largest deviation of one worker's requests from an even share, as a fraction."""
        counts = list(self.per_worker.values())
        if len(counts) < 2 or not sum(counts):
            return 0.0
        even = sum(counts) / len(counts)
        return max(abs(c - even) for c in counts) / even


def requests_by_worker(admin: int) -> dict[int, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    counts: dict[int, int] = {}
    for worker, n in SAMPLE.findall(text):
        counts[int(worker)] = counts.get(int(worker), 0) + int(n)
    return counts


def worker_pids(proxy: Service) -> list[int]:
    """The worker processes: the supervisor's `--worker` children, or the process itself."""
    found = []
    for pid in tree_pids(proxy.pid)[1:]:
        with contextlib.suppress(OSError):
            if b"--worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(pid)
    return found or [proxy.pid]


def measure(
    workers: int, connections: int, backend_port: int, backend: Service,
    args: argparse.Namespace, workdir: Path,
) -> Cell:  # fmt: skip
    with contextlib.ExitStack() as groups:  # exits after the proxy is stopped
        return _measure(workers, connections, backend_port, backend, args, workdir, groups)


def _measure(
    workers: int, connections: int, backend_port: int, backend: Service,
    args: argparse.Namespace, workdir: Path, groups: contextlib.ExitStack,
) -> Cell:  # fmt: skip
    cell = Cell(workers, connections)
    port, admin = free_port(), free_port()
    tag = f"w{workers}-c{connections}"
    conf = workdir / f"{tag}.toml"
    conf.write_text(
        CONFIG.format(workers=workers, admin=admin, port=port, backend_port=backend_port)
    )
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proxy = Service(
        "muxproxy", muxproxy_argv(args.python, conf), workdir / f"{tag}.log",
        cpu=ALL, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        problem = proxy.wait_ready(port, "ready", 30)
        if problem is None:
            problem = smoke_test(port, [args.path])
        if problem is not None:
            cell.note = f"failed to start: {problem}"
            log("\n".join(proxy.log_lines()[-8:]))
            return cell
        pids = worker_pids(proxy)
        quotas: list[CpuQuota] = []
        if args.worker_quota is not None:
            for pid in pids:
                quota = CpuQuota(args.worker_quota, f"{tag}-{pid}")
                groups.callback(quota.remove)
                quota.add(pid)
                quotas.append(quota)
        url = f"http://127.0.0.1:{port}{args.path}"
        log(f"[{tag}] {args.warmup} s warm-up, {args.duration} s")
        run_wrk(url, connections, args.warmup, ALL)
        before = requests_by_worker(admin)
        cpu0, load0 = tree_cpu_seconds(proxy.pid), tree_cpu_seconds(backend.pid)
        workers0 = sum(tree_cpu_seconds(pid) for pid in pids)
        throttle0 = [q.throttle() for q in quotas]
        wrk0, t0 = children_cpu_seconds(), time.monotonic()
        result = run_wrk(url, connections, args.duration, ALL)
        wall = time.monotonic() - t0
        proxy_cpu = tree_cpu_seconds(proxy.pid) - cpu0
        worker_cpu = sum(tree_cpu_seconds(pid) for pid in pids) - workers0
        throttle1 = [q.throttle() for q in quotas]
        load_cpu = tree_cpu_seconds(backend.pid) - load0 + children_cpu_seconds() - wrk0
        after = requests_by_worker(admin)
    except (RuntimeError, OSError) as exc:
        cell.note = str(exc).splitlines()[0][:200]
        return cell
    finally:
        proxy.stop()
    cell.rps = result.requests / result.duration_s
    cell.errors = result.socket_errors + result.status_errors
    cell.p99_ms = result.p99_ms
    cell.per_worker = {w: n - before.get(w, 0) for w, n in sorted(after.items())}
    cell.proxy_cpu = proxy_cpu / wall
    cell.worker_cpu = worker_cpu / wall
    if args.worker_quota is not None:
        cell.quota_share = quota_share(cell.worker_cpu / len(pids), args.worker_quota)
        pairs = list(zip(throttle0, throttle1, strict=True))
        cell.throttled = sum(b.throttled - a.throttled for a, b in pairs)
        cell.periods = sum(b.periods - a.periods for a, b in pairs)
    cell.load_cpu = load_cpu / wall
    return cell


def children_cpu_seconds() -> float:
    """CPU time of this harness's reaped children: wrk, once run_wrk has waited for it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def markdown(cells: Sequence[Cell], quota: bool = False) -> str:
    one = {c.connections: c.rps for c in cells if c.workers == 1 and c.rps}
    extra = " Workers' CPU | CPU / quota | Throttled periods |" if quota else ""
    lines = [
        "| Workers | Conns | Req/s | vs 1 worker | p99 ms | Errors | Requests per worker "
        f"| Largest deviation | Proxy CPU |{extra} Load CPU (wrk + nginx) | Note |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" * 3 if quota else "") + "---|---|",
    ]
    for c in cells:
        total = sum(c.per_worker.values()) or 1
        shares = " / ".join(f"{n:,} ({n / total:.0%})" for n in c.per_worker.values())
        base = one.get(c.connections)
        ratio = f"{c.rps / base:.2f}x" if base and c.rps else "-"
        share = "-" if c.quota_share is None else f"{c.quota_share:.0%}"
        capped = f" {c.worker_cpu:.0%} | {share} | {c.throttled}/{c.periods} |" if quota else ""
        lines.append(
            f"| {c.workers} | {c.connections} | {c.rps:,.0f} | {ratio} | {c.p99_ms:.1f} "
            f"| {c.errors} | {shares or '-'} | {c.imbalance:.1%} | {c.proxy_cpu:.0%} "
            f"|{capped} {c.load_cpu:.0%} | {c.note} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workers", type=_csv, default=["1", "2"], help="1,2")
    parser.add_argument("--connections", type=_csv, default=["64", "512"], help="64,512")
    parser.add_argument("--path", default="/small")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument(
        "--worker-quota",
        type=int,
        metavar="PCT",
        help="cap each worker at PCT %% of one core (its own cgroup v1 CPU group), leaving the "
        "rest of the box to wrk and nginx (default: no cap)",
    )
    args = parser.parse_args(argv)
    if problem := quota_problem(args.worker_quota):
        parser.error(f"--worker-quota: {problem}")
    args.workers = [int(w) for w in args.workers]
    args.connections = [int(c) for c in args.connections]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("nginx", "wrk", "curl", "taskset") if shutil.which(t) is None]
    if missing:
        log(f"missing required tools: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    settings = Settings(
        duration=args.duration, warmup=args.warmup, connections=args.connections,
        paths=[args.path], proxy_cpu=0, load_cpu=1,
    )  # fmt: skip
    cells: list[Cell] = []
    status = 0
    with exclusive_machine():
        start_load = loadavg()
        workdir = Path(tempfile.mkdtemp(prefix="muxproxy-bench-workers-"))
        try:
            with contextlib.ExitStack() as stack:
                backend = start_backend(workdir, settings, stack, cpu=ALL)
                for workers in args.workers:
                    for connections in args.connections:
                        cell = measure(
                            workers, connections, backend.h2_port, backend.service, args, workdir
                        )
                        log(f"[w{workers}-c{connections}] {cell.rps:,.0f} req/s {cell.note}")
                        cells.append(cell)
        except KeyboardInterrupt:
            status = 130
        finally:
            if args.keep_tmp:
                log(f"configs and logs kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    capped = (
        ""
        if args.worker_quota is None
        else f"; each worker capped at {args.worker_quota} % of one core (its own cgroup v1 "
        "CPU quota; the supervisor and the load side uncapped; p99 includes throttling)"
    )
    print(
        f"## muxproxy workers, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n"
        f"- machine: nproc={os.cpu_count()}, load average at start {' '.join(start_load)}, "
        f"at end {' '.join(loadavg())}\n"
        f"- {muxproxy_version(args.python)}\n"
        f"- load: `wrk -t1 -c<N> -d{args.duration}s` on {args.path} after {args.warmup} s, "
        f"nothing pinned (proxy, wrk and backend nginx share both CPUs){capped}\n\n"
        + markdown(cells, args.worker_quota is not None)
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
