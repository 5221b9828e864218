#!/usr/bin/env python3
"""muxproxy over HTTP/3 vs over HTTP/2, to the same backend software (Caddy), side by side.

Usage (Linux, from the repository root, as root like bench/run.py)::

    python3 bench/h3.py                          # h2 and h3, 10 s cells, 64 and 512 clients
    python3 bench/h3.py --duration 3             # quick end-to-end check (~1 minute)
    python3 bench/h3.py --protocols h3 --paths /small --connections 64

One Caddy 2.6 (GOMAXPROCS=1, pinned to `--load-cpu`) serves `/small` (100 B) and `/16k`
(16 KiB) from files over TLS, HTTP/2 on a TCP port and HTTP/3 on the UDP port of the same
number, with one certificate from a trustme CA made for the run. For every (path,
connections) cell, muxproxy is started fresh twice, once with `protocol = "h2"` and once
with `protocol = "h3"` (both `connections = 2`, certificate verified against that CA, one
worker, `--loop uvloop`, pinned to `--proxy-cpu`), and gets exactly bench/run.py's load:
a wrk warm-up, then `wrk -t1 -c<N> -d<S>s --latency` on the load CPU. The measurement is
bench/run.py's too (its helpers are imported): proxy CPU from /proc/<pid>/stat of the
proxy's process tree around the measured window, requests per proxy CPU-second, peak
backend connections sampled every 200 ms (h2: ESTABLISHED TCP sockets to the backend port;
h3: connected UDP sockets to it, one per QUIC connection), and how busy each CPU was.

Loopback only; every process runs in its own process group and is killed on exit, failure,
Ctrl-C or SIGTERM; runs of this script, bench/run.py and bench/ws_scale.py never overlap
(they share /tmp/muxproxy-bench.lock). Output: a Markdown table on stdout, and the same
Markdown plus JSON in bench/results/ (gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import trustme
from run import (
    BODY_SIZES,
    REPO_ROOT,
    RESULTS_DIR,
    SAMPLE_INTERVAL_S,
    START_TIMEOUT_S,
    Service,
    Settings,
    Snapshot,
    busy_fraction,
    command_output,
    established_to,
    exclusive_machine,
    free_port,
    loadavg,
    log,
    muxproxy_version,
    run_wrk,
    smoke_test,
)

PROTOCOLS = ("h2", "h3")
NOISE_THRESHOLD = 0.05  # flag cells where other processes used this much of the proxy CPU
CONNECTIONS = 2  # muxproxy's backend pool, both protocols

CADDYFILE = """\
# Caddy for bench/h3.py: TLS, HTTP/2 on TCP and HTTP/3 on UDP, same port number and cert.
{
	admin off
	auto_https off
	servers {
		protocols h1 h2 h3
	}
}

https://:{{port}} {
	bind 127.0.0.1
	tls {{cert}} {{key}}
	root * {{www}}
	file_server
}
"""

MUXPROXY_TOML = """\
# muxproxy for bench/h3.py: one worker, uvloop, a pool of 2 {{protocol}} connections to Caddy.
[proxy]
workers = 1
loop = "uvloop"
access_log = "off"  # Caddy in the comparison logs nothing either

[admin]
listen = "127.0.0.1:{{admin_port}}"

[[listeners]]
name = "edge"
listen = "127.0.0.1:{{port}}"

[[clusters]]
name = "app"
protocol = "{{protocol}}"
backends = ["127.0.0.1:{{backend_port}}"]
connections = 2
connect_timeout = "10s"
tls = { verify = true, ca = "{{ca}}", server_name = "localhost" }

[[routes]]
host = "*"
path_prefix = "/"
cluster = "app"
"""


def fill(template: str, values: dict[str, object]) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", str(value))
    leftover = re.search(r"\{\{\w+\}\}", template)
    if leftover:
        raise ValueError(f"no value for {leftover.group(0)}")
    return template


# --------------------------------------------------------------------------- /proc sampling


def udp_connected_to(port: int) -> int:
    """Connected UDP sockets whose remote port is `port` (state 01 in /proc/net/udp): one per
    QUIC connection of muxproxy, which gives each its own connected socket. De-duplicated by
    local address, as run.established_to does for TCP."""
    local_addresses: set[str] = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                local_addresses.add(fields[1])
    return len(local_addresses)


def backend_connections(protocol: str, port: int) -> int:
    return udp_connected_to(port) if protocol == "h3" else established_to(port)


class PeakSampler(threading.Thread):
    """The peak of `count()` every SAMPLE_INTERVAL_S until stopped."""

    def __init__(self, count: Callable[[], int]) -> None:
        super().__init__(name="sampler", daemon=True)
        self.count = count
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, self.count())
            if self._done.wait(SAMPLE_INTERVAL_S):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()


# --------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class Backend:
    service: Service
    port: int  # TCP (h1, h2) and UDP (h3)
    ca_file: Path


def free_tcp_udp_port() -> int:
    """A run.free_port() port that is also free for UDP (Caddy's HTTP/3 listener)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def make_pki(workdir: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca_file, cert, key = workdir / "ca.pem", workdir / "cert.pem", workdir / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key))
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(cert), append=i > 0)
    return ca_file, cert, key


def tls_smoke_test(port: int, ca_file: Path) -> str | None:
    """GET every path straight from Caddy over TLS (certificate checked); None if all good."""
    context = ssl.create_default_context(cafile=str(ca_file))
    for path, size in BODY_SIZES.items():
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return f"GET {path}: {exc!r}"
        finally:
            conn.close()
        if response.status != 200 or len(body) != size:
            return f"GET {path}: status {response.status}, {len(body)}-byte body"
    return None


def start_backend(workdir: Path, settings: Settings, stack: contextlib.ExitStack) -> Backend:
    www = workdir / "www"
    www.mkdir()
    for path, size in BODY_SIZES.items():
        (www / path.lstrip("/")).write_bytes(b"x" * size)
    ca_file, cert, key = make_pki(workdir)
    port = free_tcp_udp_port()
    conf = workdir / "Caddyfile"
    conf.write_text(fill(CADDYFILE, {"port": port, "cert": cert, "key": key, "www": www}))
    caddy_home = workdir / "caddy-home"
    env = {
        "GOMAXPROCS": "1",
        "HOME": str(caddy_home),
        "XDG_CONFIG_HOME": str(caddy_home / "config"),
        "XDG_DATA_HOME": str(caddy_home / "data"),
    }
    argv = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
    service = Service("backend", argv, workdir / "backend.log", cpu=settings.load_cpu, env=env)
    stack.callback(service.stop)
    problem = service.wait_ready(port, None, START_TIMEOUT_S)
    if problem is None:
        problem = tls_smoke_test(port, ca_file)
    if problem is None and not udp_listening(port):
        problem = f"no UDP listener on 127.0.0.1:{port} (HTTP/3)"
    if problem is not None:
        raise RuntimeError(f"backend Caddy failed: {problem}\n" + "\n".join(service.log_lines()))
    return Backend(service, port, ca_file)


def udp_listening(port: int) -> bool:
    """Whether some UDP socket is bound to 127.0.0.1:`port` (Caddy's HTTP/3 listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_backend_idle(backend: Backend, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if established_to(backend.port) + udp_connected_to(backend.port) == 0:
            return
        time.sleep(0.1)


# --------------------------------------------------------------------------- cells


@dataclass
class Row:
    protocol: str
    path: str
    connections: int
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
    proxy_cpu_util: float | None = None
    req_per_cpu_s: float | None = None
    h3_vs_h2: float | None = None  # this row's Req/CPU-s over the h2 row of the same cell
    peak_backend_conns: int | None = None
    # per backend connection, from muxproxy's /pools after the measured window:
    # min(the backend's stream limit, muxproxy's cap of 1000)
    stream_caps: list[int] | None = None
    backend_cpu_util: float | None = None  # Caddy's CPU seconds per wall second
    load_core_busy: float | None = None
    proxy_core_busy: float | None = None


class StartError(Exception):
    """muxproxy did not come up or failed the smoke test."""


@dataclass(frozen=True)
class Muxproxy:
    service: Service
    port: int
    admin_port: int

    def stream_caps(self) -> list[int] | None:
        """max_concurrent_streams of each backend connection, from the admin /pools JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", "/pools")
            pools = json.loads(conn.getresponse().read())
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()
        return [
            c["max_concurrent_streams"]
            for backend in pools["app"]["backends"]
            for c in backend["connections"]
        ]


@contextlib.contextmanager
def running_muxproxy(
    protocol: str, backend: Backend, settings: Settings, python: str, workdir: Path, tag: str
) -> Iterator[Muxproxy]:
    port, admin_port = free_port(), free_port()
    conf = workdir / f"{tag}.toml"
    conf.write_text(
        fill(
            MUXPROXY_TOML,
            {
                "port": port,
                "admin_port": admin_port,
                "protocol": protocol,
                "backend_port": backend.port,
                "ca": backend.ca_file,
            },
        )
    )
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    argv = [python, "-m", "muxproxy", "run", "-c", str(conf), "--loop", "uvloop"]
    log(f"[muxproxy {protocol}] {tag}: starting on 127.0.0.1:{port} -> Caddy {backend.port}")
    proxy = Service(
        f"muxproxy-{protocol}",
        argv,
        workdir / f"{tag}.log",
        cpu=settings.proxy_cpu,
        env={"PYTHONPATH": pythonpath},
        cwd=REPO_ROOT,
    )
    try:
        problem = proxy.wait_ready(port, "ready", START_TIMEOUT_S)
        if problem is None:
            smoke = smoke_test(port, settings.paths)
            problem = None if smoke is None else f"smoke test: {smoke}"
        if problem is not None:
            log(f"[muxproxy {protocol}] failed to start: {problem}; last log lines:")
            for line in proxy.log_lines()[-8:]:
                log(f"    {line}")
            raise StartError(problem)
        yield Muxproxy(proxy, port, admin_port)
    finally:
        proxy.stop()
        wait_backend_idle(backend)


def measure_cell(
    protocol: str,
    mux: Muxproxy,
    backend: Backend,
    path: str,
    connections: int,
    settings: Settings,
) -> Row:
    """bench/run.py's measurement (its Snapshot and wrk runner), with the backend connections
    counted per protocol."""
    row = Row(protocol=protocol, path=path, connections=connections)
    url = f"http://127.0.0.1:{mux.port}{path}"
    proxy = mux.service
    try:
        if settings.warmup > 0:
            run_wrk(url, connections, settings.warmup, settings.load_cpu)
        before = Snapshot.take(proxy.pid, backend.service.pid, settings)
        sampler = PeakSampler(lambda: backend_connections(protocol, backend.port))
        sampler.start()
        try:
            result = run_wrk(url, connections, settings.duration, settings.load_cpu)
        finally:
            sampler.stop()
        after = Snapshot.take(proxy.pid, backend.service.pid, settings)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        row.note = str(exc).splitlines()[0][:200]
        return row
    row.requests = result.requests
    row.duration_s = result.duration_s
    row.rps = result.requests / result.duration_s if result.duration_s else 0.0
    row.p50_ms, row.p99_ms = result.p50_ms, result.p99_ms
    row.socket_errors, row.status_errors = result.socket_errors, result.status_errors
    row.errors = result.socket_errors + result.status_errors
    wall = after.wall - before.wall
    cpu = after.proxy_cpu - before.proxy_cpu
    row.proxy_cpu_s = cpu
    row.proxy_cpu_util = cpu / wall
    row.req_per_cpu_s = result.requests / cpu if cpu > 0 else None
    row.peak_backend_conns = sampler.peak
    row.stream_caps = mux.stream_caps()
    row.backend_cpu_util = (after.backend_cpu - before.backend_cpu) / wall
    row.load_core_busy = busy_fraction(before.load_core, after.load_core)
    row.proxy_core_busy = busy_fraction(before.proxy_core, after.proxy_core)
    notes = []
    others = row.proxy_core_busy - row.proxy_cpu_util
    if others > NOISE_THRESHOLD:
        notes.append(f"{others:.0%} of CPU {settings.proxy_cpu} used by other processes")
    if not proxy.alive():
        notes.append(f"proxy exited (status {proxy.proc.returncode})")
    row.note = "; ".join(notes)
    return row


def cells(
    protocols: Sequence[str], backend: Backend, settings: Settings, python: str, workdir: Path
) -> Iterator[Row]:
    """h2 and h3 alternate within each (path, connections) cell, so that a noisy stretch of
    the shared machine hits both protocols rather than one."""
    for path in settings.paths:
        for connections in settings.connections:
            for protocol in protocols:
                tag = f"{protocol}-{path.strip('/')}-c{connections}"
                try:
                    with running_muxproxy(protocol, backend, settings, python, workdir, tag) as mux:
                        log(
                            f"[muxproxy {protocol}] {tag}: {settings.warmup} s warm-up, "
                            f"{settings.duration} s"
                        )
                        row = measure_cell(protocol, mux, backend, path, connections, settings)
                except StartError as exc:
                    row = Row(protocol, path, connections, note=f"failed to start ({exc})"[:200])
                yield row


def add_ratios(rows: Sequence[Row]) -> None:
    h2 = {(r.path, r.connections): r.req_per_cpu_s for r in rows if r.protocol == "h2"}
    for row in rows:
        base = h2.get((row.path, row.connections))
        if base and row.req_per_cpu_s is not None:
            row.h3_vs_h2 = row.req_per_cpu_s / base


# --------------------------------------------------------------------------- reporting


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _pct(value: float | None) -> str:
    return _num(None if value is None else value * 100, ".0f", "%")


def markdown_table(rows: Sequence[Row]) -> str:
    columns: list[tuple[str, Callable[[Row], str]]] = [
        ("Backend protocol", lambda r: r.protocol),
        ("Path", lambda r: r.path),
        ("Conns", lambda r: _num(r.connections, "d")),
        ("Req/s", lambda r: _num(r.rps, ",.0f")),
        ("p50 ms", lambda r: _num(r.p50_ms, ".2f")),
        ("p99 ms", lambda r: _num(r.p99_ms, ".2f")),
        ("Errors", lambda r: _num(r.errors, ",d")),
        ("Proxy CPU", lambda r: _pct(r.proxy_cpu_util)),
        ("Req/CPU-s", lambda r: _num(r.req_per_cpu_s, ",.0f")),
        ("vs h2", lambda r: _num(r.h3_vs_h2, ".2f", "x")),
        ("Peak backend conns", lambda r: _num(r.peak_backend_conns, "d")),
        ("Streams/conn", lambda r: "/".join(map(str, r.stream_caps or [])) or "-"),
        ("Caddy CPU", lambda r: _pct(r.backend_cpu_util)),
        ("Load CPU", lambda r: _pct(r.load_core_busy)),
        ("Note", lambda r: r.note.replace("|", "/")),
    ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_facts(settings: Settings, python: str) -> dict[str, object]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        match = re.search(
            r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE
        )
        cpu_model = match.group(1) if match else "?"
    aioquic = command_output(
        [python, "-c", "import importlib.metadata as m; print('aioquic', m.version('aioquic'))"]
    )
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": loadavg(),
        "versions": {
            "backend": "caddy " + command_output(["caddy", "version"]),
            "wrk": command_output(["wrk", "-v"]),
            "muxproxy": muxproxy_version(python) + f", {aioquic}",
            "trustme": importlib.metadata.version("trustme"),
        },
        "settings": asdict(settings),
    }


def facts_markdown(facts: dict[str, object], settings: Settings) -> str:
    versions = facts["versions"]
    assert isinstance(versions, dict)
    start = facts["loadavg_at_start"]
    assert isinstance(start, list)
    return "\n".join(
        [
            f"## muxproxy h2 vs h3 backend benchmark, {facts['date']}",
            "",
            f"- machine: nproc={facts['nproc']}, {facts['cpu_model']}, {facts['kernel']}, "
            f"load average at start {' '.join(start)}",
            f"- pinning: muxproxy on CPU {settings.proxy_cpu}; Caddy (GOMAXPROCS=1), wrk and "
            f"this harness on CPU {settings.load_cpu}",
            f"- load: `wrk -t1 -c{{{','.join(map(str, settings.connections))}}} "
            f"-d{settings.duration}s --latency` on {', '.join(settings.paths)}, after a "
            f"{settings.warmup} s warm-up per cell; a fresh muxproxy per cell, "
            f"`connections = {CONNECTIONS}`, TLS verified in both protocols",
            *(f"- {name}: {version}" for name, version in versions.items()),
        ]
    )


def write_results(facts: dict[str, object], rows: Sequence[Row], markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = RESULTS_DIR / f"h3-{stamp}.json"
    payload = {"facts": facts, "rows": [asdict(row) for row in rows]}
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS_DIR / f"h3-{stamp}.md").write_text(markdown + "\n")
    return json_path


# --------------------------------------------------------------------------- main


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="muxproxy with an h2 vs an h3 backend pool to the same Caddy, on loopback.",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell (10)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per cell (1)")
    parser.add_argument(
        "--connections", type=_csv, default=["64", "512"], help="client connections (64,512)"
    )
    parser.add_argument("--paths", type=_csv, default=list(BODY_SIZES), help="/small,/16k")
    parser.add_argument("--protocols", type=_csv, default=list(PROTOCOLS), help="h2,h3")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for muxproxy (0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for Caddy and wrk (1)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for muxproxy")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.paths) - set(BODY_SIZES)) + sorted(
        set(args.protocols) - set(PROTOCOLS)
    )
    if unknown:
        parser.error(f"unknown path or protocol: {', '.join(unknown)}")
    if not all(c.isdigit() and int(c) > 0 for c in args.connections):
        parser.error("--connections takes positive integers, e.g. 64,512")
    if args.duration < 1 or args.warmup < 0:
        parser.error("--duration must be >= 1 and --warmup >= 0")
    if not {args.proxy_cpu, args.load_cpu} <= os.sched_getaffinity(0):
        parser.error("--proxy-cpu/--load-cpu must be usable CPUs")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, settings: Settings) -> int:
    facts = machine_facts(settings, args.python)
    header = facts_markdown(facts, settings)
    print(header + "\n", flush=True)
    rows: list[Row] = []
    status = 0
    workdir = Path(tempfile.mkdtemp(prefix="muxproxy-bench-h3-"))
    try:
        with contextlib.ExitStack() as stack:
            backend = start_backend(workdir, settings, stack)
            log(f"[backend] Caddy on 127.0.0.1:{backend.port} (TLS: h2 over TCP, h3 over UDP)")
            for row in cells(args.protocols, backend, settings, args.python, workdir):
                rows.append(row)  # one by one: an interrupt keeps the finished cells
    except KeyboardInterrupt:
        status = 130
        log("interrupted; all started processes were stopped")
    except RuntimeError as exc:  # the backend did not start: nothing to measure
        log(str(exc))
        return 1
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_at_end"] = loadavg()
    add_ratios(rows)
    table = markdown_table(rows) + f"\n\nLoad average at end: {' '.join(loadavg())}."
    if status:
        table += " Interrupted: partial results."
    print(table, flush=True)
    json_path = write_results(facts, rows, header + "\n\n" + table)
    log(f"results written to {json_path} (and .md)")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=[int(c) for c in args.connections],
        paths=args.paths,
        proxy_cpu=args.proxy_cpu,
        load_cpu=args.load_cpu,
    )
    missing = [tool for tool in ("caddy", "wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        log(f"missing required tools: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.sched_setaffinity(0, {settings.load_cpu})  # keep the harness off the proxy's CPU
    try:
        with exclusive_machine():
            return run(args, settings)
    except KeyboardInterrupt:  # while waiting for the lock
        return 130


if __name__ == "__main__":
    sys.exit(main())
