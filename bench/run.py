#!/usr/bin/env python3
"""Side-by-side benchmark of muxproxy against HAProxy, nginx, Caddy and nghttpx.

Usage (Linux, from the repository root; runs as root, like `user root;` in the nginx configs)::

    python3 bench/run.py                            # all proxies, 10 s cells, 64 and 512 clients
    python3 bench/run.py --duration 3               # quick end-to-end check (~2 minutes)
    python3 bench/run.py --only muxproxy,haproxy    # a subset (HAProxy is the ratio baseline)
    python3 bench/run.py --connections 64,256,512 --paths /small --warmup 2 --keep-tmp
    python3 bench/run.py --only muxproxy,haproxy --proxy-quota 40   # every proxy saturated

All proxies of one run send their traffic to the SAME nginx backend (one worker, h2c with
prior knowledge, `/small` = 100 B and `/16k` = 16 KiB bodies, pinned to `--load-cpu`). Each
(proxy, path, connections) cell gets a freshly started proxy: the harness renders
`bench/conf/<proxy>.tmpl` into a temporary directory, starts the proxy with one worker/thread
pinned to `--proxy-cpu` (default 0), smoke-tests both paths, runs a wrk warm-up (`--warmup`,
default 1 s) and then the measured `wrk -t1 -c<N> -d<S>s --latency`, pinned to `--load-cpu`
(default 1, shared with the backend and this script). A proxy that does not start or fails
the smoke test gets a single "failed to start" row and the run goes on.

Per cell it reports requests/s, p50/p99 latency, errors (socket errors + responses >= 400, as
wrk counts them), the proxy's CPU use (utime+stime+cutime+cstime of its whole process tree
from /proc/<pid>/stat, before vs. after the measured window), requests per proxy CPU-second
and its ratio to HAProxy's in the same cell, the peak number of ESTABLISHED TCP connections
to the backend port and the peak RSS of the proxy's tree (both sampled every 200 ms), and how
busy the load CPU was (near 100% means the result is bounded by backend + wrk, not the proxy).
Cells where other processes took a noticeable share of the proxy's CPU are flagged in Note.
With `--proxy-quota PCT` the proxy runs in a cgroup v1 CPU group capped at PCT % of its core
(CpuQuota), so that a fast proxy is measured saturated too rather than bounded by the load
CPU; two more columns say how much of its quota it used and in how many CFS periods it was
throttled. Latency under a quota includes the throttling (up to 100 - PCT ms per period).

Machine facts and a Markdown table go to stdout (progress to stderr); the same Markdown and a
JSON file are written to bench/results/ (gitignored). Every started process runs in its own
process group and is killed on exit, failure, Ctrl-C or SIGTERM. Only 127.0.0.1 is used, and
concurrent runs on one machine wait for each other (flock on /tmp/muxproxy-bench.lock).

Proxy set-ups (details in bench/README.md): muxproxy `python -m muxproxy run -c <toml> --loop
uvloop` (ready once it prints a line starting with "ready"); HAProxy `proto h2`, `nbthread 1`;
nginx HTTP/1.1 keep-alive upstream (nginx 1.22 cannot proxy over HTTP/2, so it uses a second,
HTTP/1.1 listener of the same backend); Caddy `transport http { versions h2c }` with
GOMAXPROCS=1; nghttpx cleartext HTTP/1 frontend, `proto=h2` backend, one worker.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONF_DIR = BENCH_DIR / "conf"
RESULTS_DIR = BENCH_DIR / "results"
WRK_SCRIPT = BENCH_DIR / "wrk_report.lua"
LOCK_PATH = Path(tempfile.gettempdir()) / "muxproxy-bench.lock"

BODY_SIZES = {"/small": 100, "/16k": 16 * 1024}
BASELINE = "haproxy"
REUSE_BASELINE = "haproxy-reuse"  # the baseline when the default-mode row is not run
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL_S = 0.2
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
WRK_TIMEOUT = "2s"  # per-request timeout; slower responses count as socket errors
PORT_RANGE = (20000, 32000)  # below the default ephemeral range (32768-60999) used by clients
NOISE_THRESHOLD = 0.05  # flag cells where other processes used this much of the proxy CPU
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1, cpu controller (--proxy-quota)
CGROUP_PREFIX = "muxproxy-bench-"  # + harness pid + tag; a dead harness's groups are swept
CFS_PERIOD_US = 100_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


def render(
    template: str, dest: Path, values: Mapping[str, object], conf_dir: Path = CONF_DIR
) -> Path:
    """Fill the `{{name}}` placeholders of bench/conf/<template> and write it to dest."""
    text = (conf_dir / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    leftover = re.search(r"\{\{\w+\}\}", text)
    if leftover:
        raise ValueError(f"{template}: no value for {leftover.group(0)}")
    dest.write_text(text)
    return dest


_used_ports: set[int] = set()


def free_port() -> int:
    """A currently bindable 127.0.0.1 port, distinct from the ones handed out before."""
    while True:
        port = random.randrange(*PORT_RANGE)
        if port in _used_ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- /proc sampling


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised command name), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (by scanning every process's parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def tree_cpu_seconds(root: int) -> float:
    """CPU time of the tree: utime+stime of live processes, plus cutime+cstime (reaped ones)."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total += int(match.group(1)) * 1024
    return total


def established_to(port: int) -> int:
    """Number of ESTABLISHED TCP sockets whose remote port is `port` (i.e. client sides).

    /proc/net/tcp is not a consistent snapshot (it is read in chunks while sockets come and
    go), so sockets are de-duplicated by their local address instead of merely counted.
    """
    local_addresses: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                local_addresses.add(fields[1])
    return len(local_addresses)


def core_jiffies(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:9]]  # user nice system idle ... steal
            return sum(values) - values[3] - values[4], sum(values)  # minus idle, iowait
    raise ValueError(f"cpu{cpu} not in /proc/stat")


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


class Sampler(threading.Thread):
    """Tracks peak backend connections and peak proxy-tree RSS until stopped."""

    def __init__(self, root: int, backend_port: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.root = root
        self.backend_port = backend_port
        self.peak_backend_conns = 0
        self.peak_rss_bytes = 0
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak_backend_conns = max(
                self.peak_backend_conns, established_to(self.backend_port)
            )
            self.peak_rss_bytes = max(self.peak_rss_bytes, tree_rss_bytes(self.root))
            if self._done.wait(SAMPLE_INTERVAL_S):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()


@contextlib.contextmanager
def sampling(root: int, backend_port: int) -> Iterator[Sampler]:
    sampler = Sampler(root, backend_port)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


# --------------------------------------------------------------------------- CPU quota


@dataclass(frozen=True)
class Throttle:
    """A quota group's cumulative cpu.stat counters."""

    periods: int  # CFS periods in which the group ran
    throttled: int  # periods at whose end it had used up its quota and was held back


class CpuQuota:
    """A cgroup v1 CPU group capped at ``pct`` % of one core (CFS quota ``pct`` ms per 100 ms
    period), for ``--proxy-quota`` and ``bench/workers.py --worker-quota``.

    Why: on a 2-core box the load side (wrk or h2load + backend nginx on one core) saturates
    before a fast proxy does, so that proxy's requests per CPU-second would be measured
    unsaturated while a slow one is saturated. Under a quota every proxy is held at the same
    CPU budget, below what the load side can feed. A ``Service`` started with ``quota=`` is
    in the group from its first instruction (its shell writes itself into ``cgroup.procs``
    before exec'ing the proxy); its children and threads inherit the group. ``add`` moves a
    running process (with all its threads). ``remove`` (also via ``cpu_quota``'s exit)
    moves whatever is still inside to the root group and deletes the group.
    """

    def __init__(self, pct: int, tag: str) -> None:
        sweep_stale_quota_groups()
        self.pct = pct
        self.path = CGROUP_CPU / f"{CGROUP_PREFIX}{os.getpid()}-{tag}"
        self.path.mkdir()
        try:
            (self.path / "cpu.cfs_period_us").write_text(f"{CFS_PERIOD_US}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{CFS_PERIOD_US * pct // 100}\n")
        except OSError:
            self.remove()
            raise

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def add(self, pid: int) -> None:
        self.procs.write_text(f"{pid}\n")

    def throttle(self) -> Throttle:
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return Throttle(periods=int(stat["nr_periods"]), throttled=int(stat["nr_throttled"]))

    def remove(self) -> None:
        _remove_quota_group(self.path)


def _remove_quota_group(path: Path) -> None:
    with signals_deferred():
        for _ in range(50):
            with contextlib.suppress(OSError):
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # it may exit meanwhile
                        (CGROUP_CPU / "cgroup.procs").write_text(f"{pid}\n")
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: a process still on its way out
                time.sleep(0.1)
        log(f"could not remove cgroup {path}")


def sweep_stale_quota_groups() -> None:
    """Remove quota groups left by a harness that was killed (its pid no longer runs)."""
    with contextlib.suppress(OSError):
        for entry in CGROUP_CPU.iterdir():
            owner = entry.name.removeprefix(CGROUP_PREFIX).split("-", 1)[0]
            ours = entry.name.startswith(CGROUP_PREFIX) and owner.isdigit()
            if ours and not Path(f"/proc/{owner}").exists():
                _remove_quota_group(entry)


@contextlib.contextmanager
def cpu_quota(pct: int | None, tag: str) -> Iterator[CpuQuota | None]:
    """A CpuQuota for the block (None if ``pct`` is None), removed on every way out."""
    if pct is None:
        yield None
        return
    quota = CpuQuota(pct, tag)
    try:
        yield quota
    finally:
        quota.remove()


def quota_problem(pct: int | None) -> str | None:
    """Why ``--proxy-quota pct`` cannot work here, or None."""
    if pct is None:
        return None
    if not 1 <= pct <= 100:
        return "the quota is a percentage of one core, 1-100"
    if not os.access(CGROUP_CPU / "cpu.cfs_quota_us", os.W_OK):
        return f"needs cgroup v1's cpu controller at {CGROUP_CPU}, writable (root)"
    return None


def add_quota_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proxy-quota",
        type=int,
        metavar="PCT",
        help="run the proxy (all its processes and threads) in a cgroup v1 CPU group capped "
        "at PCT %% of one core, so every proxy is measured saturated (default: no cap)",
    )


def quota_share(cpu_util: float | None, pct: int | None) -> float | None:
    """CPU used as a fraction of the quota (about 1.0: the proxy was saturated)."""
    return None if cpu_util is None or not pct else cpu_util / (pct / 100)


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM/SIGHUP until the block is done, so cleanup is not cut short."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Service:
    """A long-running process in its own process group, output (stdout+stderr) to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        cpu: int | str,  # a CPU, or a taskset list ("0,1")
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        quota: CpuQuota | None = None,  # start it inside this CPU group
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.quota = quota
        argv = ["taskset", "-c", str(cpu), *argv]  # taskset execs: proc.pid is the service
        if quota is not None:  # the shell joins the group, then execs: still the same pid
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(quota.procs), *argv]
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env},
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def wait_ready(self, port: int, ready_prefix: str | None, timeout: float) -> str | None:
        """Wait for a log line starting with ready_prefix, or else for the port to accept.

        Returns None once ready, otherwise why not.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return f"exited with status {self.proc.returncode}"
            if ready_prefix is None:
                if port_open(port):
                    return None
            elif any(line.startswith(ready_prefix) for line in self.log_lines()):
                return None
            time.sleep(0.05)
        what = f"no {ready_prefix!r} line" if ready_prefix else f"port {port} not accepting"
        return f"{what} after {timeout:.0f} s"

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left."""
        with signals_deferred():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT_S)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    socket_errors: int
    status_errors: int
    p50_ms: float
    p99_ms: float


def run_bounded(argv: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run a load generator in its own process group; (exit status, stdout+stderr).  Raises
    subprocess.TimeoutExpired past ``timeout`` (the group is killed either way)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


def run_wrk(url: str, connections: int, seconds: int, cpu: int | str) -> WrkResult:
    """One bounded wrk run (stops by itself after `seconds`; killed if it overruns)."""
    argv = [
        "taskset",
        "-c",
        str(cpu),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(WRK_SCRIPT),
        url,
    ]
    status, output = run_bounded(argv, seconds + 30)
    match = re.search(r"^WRKJSON (.*)$", output, re.MULTILINE)
    if status != 0 or match is None:
        raise RuntimeError(f"wrk failed (status {status}): {output.strip()[-300:]}")
    data = json.loads(match.group(1))
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        status_errors=data["status"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


def smoke_test(port: int, paths: Sequence[str], front: str = "http1") -> str | None:
    """GET every path once through the proxy; None if all are 200 with the right body size.
    ``front`` "h2c": over HTTP/2 with prior knowledge (curl), as bench/h2_clients.py loads it."""
    if front == "h2c":
        return _smoke_h2c(port, paths)
    for path in paths:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return f"GET {path}: {exc!r}"
        finally:
            conn.close()
        if response.status != 200 or len(body) != BODY_SIZES[path]:
            return f"GET {path}: status {response.status}, {len(body)}-byte body"
    return None


def _smoke_h2c(port: int, paths: Sequence[str]) -> str | None:
    for path in paths:
        argv = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "5", "-o", "/dev/null"]
        argv += ["-w", "%{http_version} %{http_code} %{size_download}"]
        try:
            out = subprocess.run(
                [*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                timeout=15, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"GET {path} (h2c): {exc!r}"
        if out.stdout != f"2 200 {BODY_SIZES[path]}":
            return f"GET {path} (h2c): {out.stdout!r} {out.stderr.strip()[:200]}"
    return None


def command_output(argv: Sequence[str]) -> str:
    """First non-empty output line of a short command (stdout or stderr), or an error note."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
    return next((line for line in lines if line), "?")


# --------------------------------------------------------------------------- proxies


@dataclass(frozen=True)
class ProxySpec:
    name: str
    label: str
    template: str  # in bench/conf/
    command: Callable[[Path, Path], list[str]]  # (rendered config, work dir) -> argv
    version: Callable[[], str]
    env: Callable[[Path], dict[str, str]] = lambda workdir: {}
    cwd: Path | None = None
    ready_prefix: str | None = None  # wait for this log line instead of polling the port
    http1_backend: bool = False  # talks HTTP/1.1 to the backend's second listener
    default: bool = True  # part of a run without --only
    conf_dir: Path = CONF_DIR  # where its template is (another tree's, for --compare-tree)


def muxproxy_version(python: str, tree: Path = REPO_ROOT) -> str:
    pyproject = tomllib.loads((tree / "pyproject.toml").read_text())
    version = pyproject.get("project", {}).get("version", "?")
    rev = tree_revision(tree)
    runtime = command_output(
        [
            python,
            "-c",
            "import platform, uvloop; "
            "print('Python', platform.python_version(), 'uvloop', uvloop.__version__)",
        ]
    )
    return f"muxproxy {version} ({rev or 'no commit'}), {runtime}"


def tree_revision(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def proxy_specs(python: str, front: str = "http1") -> list[ProxySpec]:
    """The proxies; ``front`` other than "http1": those with a `conf/<front>-<template>`, which
    accepts that client protocol (bench/h2_clients.py: "h2c")."""
    specs = _proxy_specs(python)
    if front == "http1":
        return specs
    own = [replace(s, template=f"{front}-{s.template}") for s in specs]
    return [s for s in own if (CONF_DIR / s.template).exists()]


def muxproxy_argv(python: str, conf: Path, loop: str = "uvloop") -> list[str]:
    """How every bench script starts muxproxy: one process, uvloop (the ``muxproxy-trio``
    rows: trio)."""
    return [python, "-m", "muxproxy", "run", "-c", str(conf), "--loop", loop]


def muxproxy_spec(
    python: str, tree: Path = REPO_ROOT, name: str = "muxproxy", loop: str = "uvloop"
) -> ProxySpec:
    """muxproxy from ``tree`` (this one, or another checkout for ``--compare-tree``: its own
    code and its own bench/conf template, so an older tree gets a config it accepts), on
    ``loop``."""
    pythonpath = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)
    conf_dir = tree / "bench" / "conf"
    return ProxySpec(
        name=name,
        label=("muxproxy" if tree == REPO_ROOT else f"muxproxy @{tree_revision(tree)}")
        + ("" if loop == "uvloop" else f" ({loop})"),
        template="muxproxy.toml.tmpl",
        command=lambda conf, _: muxproxy_argv(python, conf, loop),
        version=lambda: muxproxy_version(python, tree),
        env=lambda _: {"PYTHONPATH": pythonpath},
        cwd=tree,
        ready_prefix="ready",
        default=tree == REPO_ROOT and loop == "uvloop",
        conf_dir=conf_dir if (conf_dir / "muxproxy.toml.tmpl").exists() else CONF_DIR,
    )


def add_compare_tree(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compare-tree",
        type=Path,
        metavar="PATH",
        help="also run muxproxy from this checkout (e.g. a git worktree of an older commit), "
        "right after this tree's, against the same HAProxy row",
    )


def with_compare_tree(
    specs: Sequence[ProxySpec], python: str, tree: Path | None, front: str = "http1"
) -> list[ProxySpec]:
    """``specs`` with muxproxy from ``tree`` right after this tree's (``--compare-tree``)."""
    out = list(specs)
    if tree is None:
        return out
    other = muxproxy_spec(python, tree.resolve(), "muxproxy-compare")
    if front != "http1":
        template = f"{front}-{other.template}"
        conf_dir = other.conf_dir if (other.conf_dir / template).exists() else CONF_DIR
        other = replace(other, template=template, conf_dir=conf_dir)
    at = next((i + 1 for i, s in enumerate(out) if s.name == "muxproxy"), len(out))
    out.insert(at, other)
    return out


def _proxy_specs(python: str) -> list[ProxySpec]:
    return [
        ProxySpec(
            name="haproxy",
            label="HAProxy",
            template="haproxy.cfg.tmpl",
            command=lambda conf, _: ["haproxy", "-db", "-f", str(conf)],
            version=lambda: command_output(["haproxy", "-v"]),
        ),
        muxproxy_spec(python),
        muxproxy_spec(python, name="muxproxy-trio", loop="trio"),
        ProxySpec(
            name="nginx",
            label="nginx (h1 upstream)",
            template="nginx-proxy.conf.tmpl",
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
            http1_backend=True,
        ),
        ProxySpec(
            name="caddy",
            label="Caddy",
            template="Caddyfile.tmpl",
            command=lambda conf, _: [
                "caddy",
                "run",
                "--config",
                str(conf),
                "--adapter",
                "caddyfile",
            ],
            version=lambda: "caddy " + command_output(["caddy", "version"]),
            env=lambda workdir: {
                "GOMAXPROCS": "1",
                "HOME": str(workdir),
                "XDG_CONFIG_HOME": str(workdir / "config"),
                "XDG_DATA_HOME": str(workdir / "data"),
            },
        ),
        ProxySpec(
            name="nghttpx",
            label="nghttpx",
            template="nghttpx.conf.tmpl",
            command=lambda conf, _: ["nghttpx", f"--conf={conf}"],
            version=lambda: command_output(["nghttpx", "--version"]),
        ),
        ProxySpec(
            name="haproxy-reuse",
            label="HAProxy (http-reuse always)",
            template="haproxy-reuse.cfg.tmpl",
            command=lambda conf, _: ["haproxy", "-db", "-f", str(conf)],
            version=lambda: command_output(["haproxy", "-v"]),
            default=False,
        ),
    ]


# --------------------------------------------------------------------------- measurement


@dataclass
class Row:
    proxy: str
    path: str | None = None
    connections: int | None = None
    note: str = ""
    requests: int | None = None
    duration_s: float | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    socket_errors: int | None = None
    status_errors: int | None = None
    proxy_cpu_s: float | None = None
    proxy_cpu_util: float | None = None  # proxy CPU seconds per wall-clock second
    quota_pct: int | None = None  # --proxy-quota
    quota_share: float | None = None  # proxy_cpu_util / quota: ~1.0 means saturated
    throttled_periods: int | None = None  # CFS periods (100 ms) that hit the quota ...
    quota_periods: int | None = None  # ... out of those in which the proxy ran
    req_per_cpu_s: float | None = None
    ratio_vs_baseline: float | None = None
    peak_backend_conns: int | None = None
    peak_rss_mib: float | None = None
    backend_cpu_util: float | None = None  # backend nginx CPU seconds per wall second
    load_core_busy: float | None = None  # busy fraction of the load CPU (backend + wrk + rest)
    proxy_core_busy: float | None = None  # busy fraction of the proxy CPU (proxy + intruders)


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    connections: list[int]
    paths: list[str]
    proxy_cpu: int
    load_cpu: int
    front: str = "http1"  # what clients speak to the proxy: "http1" (wrk) or "h2c" (h2load)
    proxy_quota: int | None = None  # % of one core for the proxy's cgroup (None: no cap)


# A load generator: (url, connections, seconds, cpu) -> its summary.  run_wrk by default.
Load = Callable[[str, int, int, int], WrkResult]


@dataclass(frozen=True)
class Backend:
    service: Service
    h2_port: int
    h1_port: int


def start_backend(
    workdir: Path, settings: Settings, stack: contextlib.ExitStack, cpu: int | str | None = None
) -> Backend:
    """The nginx backend, pinned to ``cpu`` (default: the load CPU)."""
    www = workdir / "www"
    www.mkdir()
    for path, size in BODY_SIZES.items():
        (www / path.lstrip("/")).write_bytes(b"x" * size)
    h2_port, h1_port = free_port(), free_port()
    conf = render(
        "backend-nginx.conf.tmpl",
        workdir / "backend-nginx.conf",
        {"dir": workdir, "h2_port": h2_port, "h1_port": h1_port},
    )
    argv = ["nginx", "-p", f"{workdir}/", "-c", str(conf), "-e", "stderr"]
    cpu = settings.load_cpu if cpu is None else cpu
    service = Service("backend", argv, workdir / "backend.log", cpu=cpu)
    stack.callback(service.stop)
    problem = service.wait_ready(h2_port, None, START_TIMEOUT_S)
    if problem is None and not port_open(h1_port):
        problem = f"port {h1_port} not accepting"
    if problem is None:
        problem = smoke_test(h1_port, list(BODY_SIZES))
    if problem is not None:
        raise RuntimeError(f"backend nginx failed: {problem}\n" + "\n".join(service.log_lines()))
    return Backend(service, h2_port, h1_port)


def wait_backend_idle(backend: Backend, timeout: float = 5.0) -> None:
    """Let the previous proxy's backend connections go away before starting the next one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if established_to(backend.h2_port) + established_to(backend.h1_port) == 0:
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters at one instant; two of them bracket the measured window."""

    wall: float
    proxy_cpu: float
    backend_cpu: float
    proxy_core: tuple[int, int]
    load_core: tuple[int, int]
    throttle: Throttle | None = None  # the proxy's quota group, if any

    @classmethod
    def take(
        cls, proxy_pid: int, backend_pid: int, settings: Settings, quota: CpuQuota | None = None
    ) -> Snapshot:
        return cls(
            wall=time.monotonic(),
            proxy_cpu=tree_cpu_seconds(proxy_pid),
            backend_cpu=tree_cpu_seconds(backend_pid),
            proxy_core=core_jiffies(settings.proxy_cpu),
            load_core=core_jiffies(settings.load_cpu),
            throttle=None if quota is None else quota.throttle(),
        )


def measure_cell(
    spec: ProxySpec,
    proxy: Service,
    port: int,
    backend: Backend,
    path: str,
    connections: int,
    settings: Settings,
    load: Load = run_wrk,
) -> Row:
    row = Row(proxy=spec.name, path=path, connections=connections)
    url = f"http://127.0.0.1:{port}{path}"
    backend_port = backend.h1_port if spec.http1_backend else backend.h2_port
    try:
        if settings.warmup > 0:
            load(url, connections, settings.warmup, settings.load_cpu)
        before = Snapshot.take(proxy.pid, backend.service.pid, settings, proxy.quota)
        with sampling(proxy.pid, backend_port) as sampler:
            result = load(url, connections, settings.duration, settings.load_cpu)
        after = Snapshot.take(proxy.pid, backend.service.pid, settings, proxy.quota)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        row.note = str(exc).splitlines()[0][:200]
        return row
    row.requests = result.requests
    row.duration_s = result.duration_s
    row.rps = result.requests / result.duration_s if result.duration_s else 0.0
    row.p50_ms = result.p50_ms
    row.p99_ms = result.p99_ms
    row.socket_errors = result.socket_errors
    row.status_errors = result.status_errors
    row.errors = result.socket_errors + result.status_errors
    wall = after.wall - before.wall
    cpu = after.proxy_cpu - before.proxy_cpu
    row.proxy_cpu_s = cpu
    row.proxy_cpu_util = cpu / wall
    row.req_per_cpu_s = result.requests / cpu if cpu > 0 else None
    if proxy.quota is not None and before.throttle and after.throttle:
        row.quota_pct = proxy.quota.pct
        row.quota_share = quota_share(row.proxy_cpu_util, row.quota_pct)
        row.throttled_periods = after.throttle.throttled - before.throttle.throttled
        row.quota_periods = after.throttle.periods - before.throttle.periods
    row.peak_backend_conns = sampler.peak_backend_conns
    row.peak_rss_mib = sampler.peak_rss_bytes / 2**20
    row.backend_cpu_util = (after.backend_cpu - before.backend_cpu) / wall
    row.load_core_busy = busy_fraction(before.load_core, after.load_core)
    row.proxy_core_busy = busy_fraction(before.proxy_core, after.proxy_core)
    others = row.proxy_core_busy - row.proxy_cpu_util
    notes = []
    if others > NOISE_THRESHOLD:
        notes.append(f"{others:.0%} of CPU {settings.proxy_cpu} used by other processes")
    if not proxy.alive():
        notes.append(f"proxy exited (status {proxy.proc.returncode})")
    row.note = "; ".join(notes)
    return row


class StartError(Exception):
    """The proxy did not come up (or failed the smoke test)."""


@contextlib.contextmanager
def running_proxy(
    spec: ProxySpec, backend: Backend, settings: Settings, proxy_dir: Path, tag: str
) -> Iterator[tuple[Service, int]]:
    """Start a fresh proxy instance, wait until it serves both paths, stop it afterwards."""
    port = free_port()
    backend_port = backend.h1_port if spec.http1_backend else backend.h2_port
    conf = render(
        spec.template,
        proxy_dir / spec.template.removesuffix(".tmpl"),
        {"dir": proxy_dir, "port": port, "backend_port": backend_port},
        spec.conf_dir,
    )
    argv = spec.command(conf, proxy_dir)
    if shutil.which(argv[0]) is None:
        raise StartError(f"{argv[0]} not installed")
    log(f"[{spec.name}] {tag}: starting on 127.0.0.1:{port} -> backend port {backend_port}")
    with cpu_quota(settings.proxy_quota, f"{spec.name}-{tag}") as quota:
        proxy = Service(
            spec.name,
            argv,
            proxy_dir / f"{tag}.log",
            cpu=settings.proxy_cpu,
            env=spec.env(proxy_dir),
            cwd=spec.cwd,
            quota=quota,
        )
        try:
            problem = proxy.wait_ready(port, spec.ready_prefix, START_TIMEOUT_S)
            if problem is None:
                smoke = smoke_test(port, settings.paths, settings.front)
                problem = None if smoke is None else f"smoke test: {smoke}"
            if problem is not None:
                log(f"[{spec.name}] failed to start: {problem}; last log lines:")
                for line in proxy.log_lines()[-8:]:
                    log(f"    {line}")
                raise StartError(problem)
            yield proxy, port
        finally:
            proxy.stop()  # before the quota group goes
            wait_backend_idle(backend)


def bench_proxy(
    spec: ProxySpec, backend: Backend, settings: Settings, workdir: Path, load: Load = run_wrk
) -> Iterator[Row]:
    """Rows for all cells of one proxy; every cell gets a freshly started proxy instance."""
    proxy_dir = workdir / spec.name
    proxy_dir.mkdir()
    first = True
    for path in settings.paths:
        for connections in settings.connections:
            tag = f"{path.strip('/')}-c{connections}"
            try:
                with running_proxy(spec, backend, settings, proxy_dir, tag) as (proxy, port):
                    log(f"[{spec.name}] {tag}: {settings.warmup} s warm-up, {settings.duration} s")
                    row = measure_cell(
                        spec, proxy, port, backend, path, connections, settings, load
                    )
            except StartError as exc:
                note = f"failed to start ({exc})"[:200]
                if first:  # not runnable at all: one row for the whole proxy
                    yield Row(proxy=spec.name, note=note)
                    return
                row = Row(proxy=spec.name, path=path, connections=connections, note=note)
            first = False
            yield row


def add_ratios(rows: Sequence[Row]) -> None:
    """Each row's req/CPU-s as a ratio to HAProxy's in the same cell: the default-mode
    ``haproxy`` row, or ``haproxy-reuse`` (``http-reuse always``) when only that one ran."""
    names = {row.proxy for row in rows}
    name = BASELINE if BASELINE in names or REUSE_BASELINE not in names else REUSE_BASELINE
    baseline = {
        (row.path, row.connections): row.req_per_cpu_s for row in rows if row.proxy == name
    }
    for row in rows:
        base = baseline.get((row.path, row.connections))
        if base and row.req_per_cpu_s is not None:
            row.ratio_vs_baseline = row.req_per_cpu_s / base


# --------------------------------------------------------------------------- reporting


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float | None) -> str:
    return _num(None if value is None else value * 100, ".0f", "%")


def _throttled(row: Row) -> str:
    if row.throttled_periods is None or row.quota_periods is None:
        return "-"
    return f"{row.throttled_periods}/{row.quota_periods}"


def quota_line(pct: int | None) -> str:
    """What --proxy-quota did, for a run's header; empty without it."""
    if pct is None:
        return ""
    return (
        f", capped at {pct} % of it (cgroup v1 CPU quota {CFS_PERIOD_US * pct // 100 // 1000} ms"
        f" per {CFS_PERIOD_US // 1000} ms period; latency percentiles include throttling)"
    )


def markdown_table(rows: Sequence[Row], labels: Mapping[str, str]) -> str:
    columns: list[tuple[str, Callable[[Row], str]]] = [
        ("Proxy", lambda row: labels.get(row.proxy, row.proxy)),
        ("Path", lambda row: row.path or "-"),
        ("Conns", lambda row: _num(row.connections, "d")),
        ("Req/s", lambda row: _num(row.rps, ",.0f")),
        ("p50 ms", lambda row: _num(row.p50_ms, ".2f")),
        ("p99 ms", lambda row: _num(row.p99_ms, ".2f")),
        ("Errors", lambda row: _num(row.errors, ",d")),
        ("Proxy CPU", lambda row: _pct(row.proxy_cpu_util)),
    ]
    if any(row.quota_pct for row in rows):  # --proxy-quota: was each proxy saturated?
        columns += [
            ("CPU / quota", lambda row: _pct(row.quota_share)),
            ("Throttled periods", _throttled),
        ]
    columns += [
        ("Req/CPU-s", lambda row: _num(row.req_per_cpu_s, ",.0f")),
        ("vs HAProxy", lambda row: _num(row.ratio_vs_baseline, ".2f", "x")),
        ("Peak backend conns", lambda row: _num(row.peak_backend_conns, "d")),
        ("Peak RSS MiB", lambda row: _num(row.peak_rss_mib, ".1f")),
        ("Load CPU", lambda row: _pct(row.load_core_busy)),
        ("Note", lambda row: row.note.replace("|", "/")),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_facts(specs: Sequence[ProxySpec], settings: Settings) -> dict[str, object]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
        cpu_model = match.group(1) if match else "?"
    versions = {
        "backend": command_output(["nginx", "-v"]),
        "wrk": command_output(["wrk", "-v"]),
        **{spec.name: spec.version() for spec in specs},
    }
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": loadavg(),
        "python": platform.python_version(),
        "versions": versions,
        "settings": asdict(settings),
    }


def facts_markdown(facts: Mapping[str, object], settings: Settings) -> str:
    versions = facts["versions"]
    assert isinstance(versions, dict)
    loadavg = facts["loadavg_at_start"]
    assert isinstance(loadavg, list)
    lines = [
        f"## muxproxy benchmark, {facts['date']}",
        "",
        f"- machine: nproc={facts['nproc']}, {facts['cpu_model']}, {facts['kernel']}, "
        f"load average at start {' '.join(loadavg)}",
        f"- pinning: proxy on CPU {settings.proxy_cpu}{quota_line(settings.proxy_quota)}; "
        f"backend nginx, wrk and this harness "
        f"on CPU {settings.load_cpu}",
        f"- load: `wrk -t1 -c{{{','.join(map(str, settings.connections))}}} "
        f"-d{settings.duration}s --latency` on {', '.join(settings.paths)}, "
        f"after a {settings.warmup} s warm-up per cell",
    ]
    lines += [f"- {name}: {version}" for name, version in versions.items()]
    return "\n".join(lines)


def write_results(facts: Mapping[str, object], rows: Sequence[Row], markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = RESULTS_DIR / f"bench-{stamp}.json"
    payload = {"facts": facts, "rows": [asdict(row) for row in rows]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS_DIR / f"bench-{stamp}.md").write_text(markdown + "\n")
    return json_path


# --------------------------------------------------------------------------- main


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None, specs: Sequence[ProxySpec]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark muxproxy against HAProxy, nginx, Caddy and nghttpx on loopback.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell (10)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per cell (1)")
    parser.add_argument(
        "--connections", type=_csv, default=["64", "512"], help="client connections (64,512)"
    )
    parser.add_argument("--paths", type=_csv, default=list(BODY_SIZES), help="/small,/16k")
    names = [spec.name for spec in specs]
    parser.add_argument(
        "--only",
        type=_csv,
        default=[spec.name for spec in specs if spec.default],
        help=f"proxies to run, among {','.join(names)} (default: all but haproxy-reuse)",
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for backend and wrk (1)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for muxproxy")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    add_compare_tree(parser)
    add_quota_arg(parser)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(names)) + sorted(set(args.paths) - set(BODY_SIZES))
    if unknown:
        parser.error(f"unknown proxy or path: {', '.join(unknown)}")
    if problem := quota_problem(args.proxy_quota):
        parser.error(f"--proxy-quota: {problem}")
    if not all(c.isdigit() and int(c) > 0 for c in args.connections):
        parser.error("--connections takes positive integers, e.g. 64,512")
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be >= 1 and --warmup >= 0")
    cpus = os.sched_getaffinity(0)
    if not {args.proxy_cpu, args.load_cpu} <= cpus:
        parser.error(f"--proxy-cpu/--load-cpu must be among the usable CPUs {sorted(cpus)}")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def exclusive_machine() -> Iterator[None]:
    """Serialise benchmark runs on this machine: two at once would skew each other."""
    with LOCK_PATH.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            log(f"waiting for another benchmark run (pid {holder}) to finish ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield  # the lock goes with the file descriptor


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def run(specs: Sequence[ProxySpec], settings: Settings, keep_tmp: bool) -> int:
    facts = machine_facts(specs, settings)
    header = facts_markdown(facts, settings)
    print(header + "\n", flush=True)

    rows: list[Row] = []
    status = 0
    workdir = Path(tempfile.mkdtemp(prefix="muxproxy-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            backend = start_backend(workdir, settings, stack)
            log(f"[backend] nginx h2c on {backend.h2_port}, HTTP/1.1 on {backend.h1_port}")
            for spec in specs:
                for row in bench_proxy(spec, backend, settings, workdir):
                    rows.append(row)  # one by one: an interrupt keeps the finished cells
    except KeyboardInterrupt:
        status = 130
        log("interrupted; all started processes were stopped")
    except RuntimeError as exc:  # the backend did not start: nothing to measure
        log(str(exc))
        return 1
    finally:
        if keep_tmp:
            log(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    facts["loadavg_at_end"] = loadavg()
    add_ratios(rows)
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
    specs = with_compare_tree(specs, args.python, args.compare_tree)
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=[int(c) for c in args.connections],
        paths=args.paths,
        proxy_cpu=args.proxy_cpu,
        load_cpu=args.load_cpu,
        proxy_quota=args.proxy_quota,
    )
    missing = [tool for tool in ("nginx", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        log(f"missing required tools: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.sched_setaffinity(0, {settings.load_cpu})  # keep the harness off the proxy's CPU
    try:
        with exclusive_machine():
            return run(specs, settings, args.keep_tmp)
    except KeyboardInterrupt:  # while waiting for the lock
        return 130


if __name__ == "__main__":
    sys.exit(main())
