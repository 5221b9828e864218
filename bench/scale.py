#!/usr/bin/env python3
"""The port limit, reproduced: N clients through one proxy to ONE backend ip:port.

Usage (Linux, from the repository root, as root like the other bench scripts)::

    python3 bench/scale.py --n 20000 --workers 2 --json bench/results/scale-20k.json
    python3 bench/scale.py --n 100000 --workers 6 --connections 4 --kind ws --json ws.json
    python3 bench/scale.py --n 100000 --workers 6 --kind http --json http.json

For each proxy (muxproxy, nginx with an HTTP/1.1 upstream, HAProxy `proto h2`, HAProxy with
`http-reuse always`) a fresh origin (bench/scale_origin.py: h2c with RFC 8441 and HTTP/1.1 on
one port, SO_REUSEPORT processes) and a fresh proxy are started; every proxy connects from
127.0.0.1 to the same 127.0.0.1:port, so it has one ephemeral port range (ip_local_port_range)
towards the backend. Load processes (bench/ws_load.py for `--kind ws`, bench/scale_http_load.py
for `--kind http`; at most `--clients-per-process` each, the box allows 20,000 descriptors per
process) open N client connections from several 127.0.0.x source addresses. Then:

- `--kind ws`: N idle WebSockets, then `--echo-sockets` of them echo for `--echo-seconds`.
- `--kind http`: N keep-alive HTTP/1.1 clients, each sending `GET /poll` (the origin holds it
  1-5 s) and pausing 0-2 s, for `--http-seconds`; the latency is the proxy's added latency.

The JSON (`--json`) holds per proxy: reached, failed (kinds and counts, including the proxy's
own log lines about ports and descriptors), backend_conns and ports_used (from `ss` on the
backend port), rss_mib (whole process tree), kib_per_ws, ramp_s, ramp_cpu_s, echo_p50_ms,
echo_p99_ms. Process management (process groups, lock, /proc accounting, load processes) is
bench/run.py's and bench/ws_scale.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from run import (
    BENCH_DIR,
    REPO_ROOT,
    Service,
    command_output,
    exclusive_machine,
    free_port,
    loadavg,
    log,
    muxproxy_version,
    tree_cpu_seconds,
    tree_rss_bytes,
)
from ws_load import echo_once
from ws_scale import (
    LoadClient,
    LoadError,
    PeakConns,
    _interrupt,
    percentile,
    rss_median,
    split,
    tree_max_fds,
)
from ws_scale import (
    Settings as LoadSettings,
)

START_TIMEOUT_S = 30.0
FD_SLACK = 1000
# Lines in a proxy's log that say how it failed, and the kind they are counted under.
LOG_FAILURES = [
    (re.compile(r"Cannot assign requested address|\(99:|EADDRNOTAVAIL"), "EADDRNOTAVAIL"),
    (re.compile(r"no free ports", re.I), "EADDRNOTAVAIL (no free ports)"),
    (re.compile(r"Too many open files|\(24:|EMFILE"), "EMFILE"),
    (re.compile(r"worker_connections are not enough"), "worker_connections exhausted"),
    (re.compile(r"Cannot get a server socket|out of sockets", re.I), "no server socket"),
    (re.compile(r"Traceback"), "traceback"),
]


@dataclass(frozen=True)
class Options:
    n: int
    workers: int
    connections: int
    kind: str
    clients_per_process: int
    sources: int
    batch: int
    settle: float
    echo_sockets: int
    echo_seconds: float
    http_seconds: float
    http_rate: float
    timeout: float
    stall: float
    ramp_timeout: float
    nofile: int
    python: str

    @property
    def origin_processes(self) -> int:
        # A proxy holding one backend connection per client cannot pass ~28k ports anyway.
        return max(1, math.ceil(min(self.n, 30_000) / (self.nofile - 2 * FD_SLACK)))

    def load_settings(self) -> LoadSettings:
        return LoadSettings(
            n=self.n,
            clients_per_process=self.clients_per_process,
            sources=self.sources,
            batch=self.batch,
            settle=self.settle,
            echo_sockets=self.echo_sockets,
            echo_rate=float(self.echo_sockets),
            echo_seconds=self.echo_seconds,
            echo_size=32,
            echo_timeout=self.timeout,
            handshake_timeout=self.timeout,
            ramp_timeout=self.ramp_timeout,
            proxy_cpu=0,
            load_cpu="0-1",  # type: ignore[arg-type]  # taskset list: no pinning on a shared box
            nofile=self.nofile,
            nginx_workers=0,
            backend_worker_class="",
            backend_scheduler="",
        )


# --------------------------------------------------------------------------- proxy configs


def muxproxy_conf(o: Options, d: Path, port: int, bport: int) -> list[str]:
    # Thousands of streams per connection: our cap and the origin's SETTINGS both allow N.
    streams = min(2**31 - 1, max(1000, o.n))
    (d / "muxproxy.toml").write_text(
        f"""[proxy]
workers = {o.workers}
loop = "uvloop"

[[listeners]]
name = "edge"
listen = "127.0.0.1:{port}"
[listeners.limits]
max_connections = {o.n + FD_SLACK}
idle_timeout = "1h"

[[clusters]]
name = "app"
protocol = "h2c"
backends = ["127.0.0.1:{bport}"]
connections = {o.connections}
max_streams_per_connection = {streams}
max_pending = {o.n}
pending_timeout = "60s"
request_timeout = "60s"
tunnel_idle_timeout = "1h"

[[routes]]
cluster = "app"
websocket = true
"""
    )
    return [o.python, "-m", "muxproxy", "run", "-c", str(d / "muxproxy.toml"), "--loop", "uvloop"]


def nginx_workers(o: Options) -> int:
    # 2 fds per client (client + upstream connection) under the per-process limit
    return max(o.workers, math.ceil(2 * o.n / (o.nofile - FD_SLACK)))


def nginx_conf(o: Options, d: Path, port: int, bport: int) -> list[str]:
    temps = "\n".join(
        f"    {kind}_temp_path {d}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        f"""worker_processes {nginx_workers(o)};
worker_rlimit_nofile {o.nofile};
daemon off;
master_process on;
user root;
pid {d}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {o.nofile - 100}; }}
http {{
    access_log off;
{temps}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream app {{
        server 127.0.0.1:{bport};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 1h;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        keepalive_timeout 1h;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""
    )
    return ["nginx", "-p", f"{d}/", "-c", str(d / "nginx.conf"), "-e", "stderr"]


def haproxy_processes(o: Options, reuse: bool) -> int:
    """HAProxy 2.6 has no nbproc: one process, so one 20,000-descriptor limit. Like nginx's
    workers, enough processes on one SO_REUSEPORT port (HAProxy's default on Linux) that each
    stays under its limit: 2 descriptors per client without reuse, 1 (plus a few backend
    connections) with it. Then it runs out of what is measured, ports, not of descriptors."""
    per_client = 1 if reuse else 2
    return max(1, math.ceil(per_client * o.n / (o.nofile - 3 * FD_SLACK)))


def haproxy_conf(o: Options, d: Path, port: int, bport: int, reuse: bool) -> list[str]:
    processes = haproxy_processes(o, reuse)
    # Each process takes at most what its descriptors allow; the kernel spreads the clients.
    maxconn = min(2 * o.n + FD_SLACK, (o.nofile - FD_SLACK) // (1 if reuse else 2))
    (d / "haproxy.cfg").write_text(
        f"""global
    nbthread {o.workers if processes == 1 else 1}
    maxconn {maxconn}
    no strict-limits

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 30s
    timeout http-keep-alive 1h

frontend edge
    bind 127.0.0.1:{port} backlog 4096
    default_backend app

backend app
{"    http-reuse always" if reuse else ""}
    server s1 127.0.0.1:{bport} proto h2 ws h2
"""
    )
    one = f"haproxy -db -f {d / 'haproxy.cfg'}"
    if processes == 1:
        return one.split()
    # One process group (the harness stops and measures the whole tree): a shell that waits.
    return ["sh", "-c", " & ".join([one] * processes) + " & wait"]


@dataclass(frozen=True)
class Proxy:
    name: str
    label: str
    configure: Callable[[Options, Path, int, int], list[str]]
    version: Callable[[Options], str]
    ready_prefix: str | None = None


PROXIES = [
    Proxy(
        "muxproxy",
        "muxproxy (W workers x K h2c connections)",
        muxproxy_conf,
        lambda o: muxproxy_version(o.python),
        "ready",
    ),
    Proxy(
        "nginx",
        "nginx (HTTP/1.1 upstream)",
        nginx_conf,
        lambda o: command_output(["nginx", "-v"]),
    ),
    Proxy(
        "haproxy",
        "HAProxy (proto h2)",
        lambda o, d, p, b: haproxy_conf(o, d, p, b, reuse=False),
        lambda o: command_output(["haproxy", "-v"]).splitlines()[0],
    ),
    Proxy(
        "haproxy-reuse",
        "HAProxy (proto h2, http-reuse always)",
        lambda o, d, p, b: haproxy_conf(o, d, p, b, reuse=True),
        lambda o: command_output(["haproxy", "-v"]).splitlines()[0],
    ),
]


# --------------------------------------------------------------------------- measurement


def ss_backend(port: int) -> tuple[int, int]:
    """(ESTABLISHED TCP connections to 127.0.0.1:port, distinct local ports they use)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    locals_ = {line.split()[2] for line in out.splitlines() if len(line.split()) >= 4}
    return len(locals_), len({addr.rsplit(":", 1)[1] for addr in locals_})


def log_failures(service: Service) -> dict[str, int]:
    found: Counter[str] = Counter()
    for line in service.log_lines():
        for pattern, kind in LOG_FAILURES:
            if pattern.search(line):
                found[kind] += 1
                break
    return dict(found)


def smoke(kind: str, port: int) -> str | None:
    if kind == "ws":
        return echo_once(port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/poll?hold_ms=10")
        response = conn.getresponse()
        body = response.read()
        return None if response.status == 200 and body == b"ok" else f"status {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    finally:
        conn.close()


@dataclass
class Result:
    proxy: str
    kind: str
    n: int
    note: str = ""
    reached: int | None = None
    failed: dict[str, Any] = field(default_factory=lambda: {"total": 0, "kinds": {}})
    backend_conns: int | None = None
    backend_conns_peak: int | None = None
    ports_used: int | None = None
    rss_baseline_mib: float | None = None
    rss_mib: float | None = None
    kib_per_ws: float | None = None
    ramp_s: float | None = None
    ramp_cpu_s: float | None = None
    echo_p50_ms: float | None = None
    echo_p99_ms: float | None = None
    echo_samples: int | None = None
    phase_cpu_s: float | None = None
    phase_late: int | None = None  # sends more than one period behind their slot
    loadavg_phase: list[str] = field(default_factory=list)  # the box is shared: at phase end
    open_after: int | None = None
    proxy_processes: int | None = None
    proxy_max_fds: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def fail(self, kind: str, count: int) -> None:
        if count:
            kinds = self.failed["kinds"]
            kinds[kind] = kinds.get(kind, 0) + count
            self.failed["total"] += count


def start(
    name: str,
    argv: list[str],
    d: Path,
    port: int,
    ready: str | None,
    stack: contextlib.ExitStack,
    **kw: Any,
) -> tuple[Service | None, str | None]:
    if shutil.which(argv[0]) is None:
        return None, f"{argv[0]} not installed"
    service = Service(name, argv, d / f"{name}.log", cpu="0-1", **kw)  # type: ignore[arg-type]
    stack.callback(service.stop)
    problem = service.wait_ready(port, ready, START_TIMEOUT_S)
    if problem is not None:
        for line in service.log_lines()[-8:]:
            log(f"    {line}")
    return service, problem


def ramp(clients: Sequence[LoadClient], o: Options) -> tuple[list[dict[str, Any]], list[Any]]:
    """Wait for every load process's "opened" report; give up on the ones still ramping once
    no client at all got through for `o.stall` seconds (the proxy stopped taking clients).
    Returns (reports, load processes that had not reported)."""
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + o.ramp_timeout + o.timeout + 30
    last_total, last_change, last_log = -1, time.monotonic(), 0.0
    while len(reports) < len(clients):
        for c in clients:
            if c.index in reports:
                continue
            try:
                reports[c.index] = c.expect("opened", time.monotonic() + 0.2)
            except LoadError:
                raise
            except RuntimeError:
                if c.proc.poll() is not None:
                    raise
        now = time.monotonic()
        total = sum(
            reports[c.index]["open"] if c.index in reports else c.progress_open for c in clients
        )
        if total != last_total:
            last_total, last_change = total, now
        if now - last_log >= 5:
            last_log = now
            log(f"    ramp: {total} open")
        if now - last_change > o.stall or now > deadline:
            break
    return list(reports.values()), [c for c in clients if c.index not in reports]


def bench(proxy: Proxy, o: Options, root: Path) -> Result:
    r = Result(proxy=proxy.name, kind=o.kind, n=o.n)
    d = root / proxy.name
    d.mkdir()
    with contextlib.ExitStack() as stack:
        bport = free_port()
        _origin, problem = start(
            "origin",
            [
                sys.executable,
                str(BENCH_DIR / "scale_origin.py"),
                "--port",
                str(bport),
                "--processes",
                str(o.origin_processes),
            ],
            d,
            bport,
            None,
            stack,
        )
        if problem is not None:
            r.note = f"origin failed to start: {problem}"
            return r
        port = free_port()
        argv = proxy.configure(o, d, port, bport)
        env = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            )
        }
        service, problem = start(
            "proxy", argv, d, port, proxy.ready_prefix, stack, env=env, cwd=REPO_ROOT
        )
        if service is None or problem is not None:
            r.note = f"failed to start: {problem}"
            return r
        problem = smoke(o.kind, port)
        if problem is not None:
            r.note = f"smoke test failed: {problem}"
            return r
        if proxy.name == "nginx":
            r.settings["nginx_workers"] = nginx_workers(o)
        if proxy.name.startswith("haproxy"):
            r.settings["haproxy_processes"] = haproxy_processes(o, proxy.name == "haproxy-reuse")
        if proxy.name == "muxproxy":
            r.settings |= {
                "workers": o.workers,
                "connections": o.connections,
                "max_streams_per_connection": max(1000, o.n),
            }
        time.sleep(1.0)
        r.rss_baseline_mib = rss_median(service.pid) / 2**20
        log(
            f"[{proxy.name}] baseline RSS {r.rss_baseline_mib:.1f} MiB; opening {o.n} "
            f"{o.kind} clients"
        )
        peak = PeakConns(bport, lambda: ss_backend(bport)[0], interval=2.0)
        peak.start()
        stack.callback(peak.stop)
        settings = o.load_settings()
        script = "ws_load.py" if o.kind == "ws" else "scale_http_load.py"
        clients = []
        left = o.n
        for index in range(settings.processes):
            count = min(settings.clients_per_process, left)
            left -= count
            client = LoadClient(index, count, port, settings, d / f"load{index}.log", script)
            stack.callback(client.stop)
            clients.append(client)
        cpu_before = tree_cpu_seconds(service.pid)
        began = time.monotonic()
        try:
            opened, stalled = ramp(clients, o)
        except RuntimeError as exc:
            r.note = f"ramp failed: {exc}"
            return r
        r.ramp_cpu_s = round(tree_cpu_seconds(service.pid) - cpu_before, 2)
        r.ramp_s = round(max([x["seconds"] for x in opened] + [time.monotonic() - began]), 2)
        r.note = ""
        if stalled:
            # The proxy stopped taking clients (ports or descriptors gone). The stalled load
            # processes stop opening (a ramp that keeps failing connects would load the box
            # during the measurement); what they never attempted counts as failed, and the
            # rest of the run measures what was reached.
            at = sum(x["open"] for x in opened) + sum(c.progress_open for c in stalled)
            r.note = f"ramp stalled at {at} of {o.n}"
            for c in stalled:
                c.send({"cmd": "stop_ramp"})
            deadline = time.monotonic() + o.timeout + 15
            still = []
            for c in stalled:
                try:
                    opened.append(c.expect("opened", deadline))
                except RuntimeError:
                    still.append(c)
            stalled = still
        r.reached = sum(x["open"] for x in opened) + sum(c.progress_open for c in stalled)
        for x in opened:
            for reason, count in x["failures"].items():
                r.fail(f"connect: {reason}", count)
        if stalled:  # did not even report after being stopped
            failed = sum(c.progress_failed for c in stalled)
            pending = sum(c.count for c in stalled) - failed - sum(c.progress_open for c in stalled)
            r.fail("connect: failed before the stall", failed)
            r.fail(f"connect: no progress for {o.stall:g} s (still pending)", pending)
        log(
            f"[{proxy.name}] ramp: {r.reached} open in {r.ramp_s:.1f} s, "
            f"failures {r.failed['kinds'] or 'none'}"
        )
        time.sleep(o.settle)
        r.rss_mib = rss_median(service.pid) / 2**20
        r.backend_conns, r.ports_used = ss_backend(bport)
        r.proxy_processes, r.proxy_max_fds = tree_max_fds(service.pid)
        deadline = time.monotonic() + 60
        for c in clients:
            c.send({"cmd": "status"})
        still_open = sum(c.expect("status", deadline)["open"] for c in clients)
        if still_open:
            r.kib_per_ws = round((r.rss_mib - r.rss_baseline_mib) * 1024 / still_open, 2)
        r.fail("closed while idle", (r.reached or 0) - still_open)
        # the phase: echo sample (ws) or the long-poll minute (http)
        seconds = o.echo_seconds if o.kind == "ws" else o.http_seconds
        shares = split(min(o.echo_sockets, still_open), [c.count for c in clients])
        cpu_before = tree_cpu_seconds(service.pid)
        for c, share in zip(clients, shares, strict=True):
            # ws: each echoing socket once a second; http: --http-rate polls/s in all
            rate = share if o.kind == "ws" else o.http_rate * share / max(1, sum(shares))
            c.send(
                {
                    "cmd": "echo",
                    "count": share,
                    "rate": max(rate, 0.001),
                    "seconds": seconds,
                    "size": 32,
                    "timeout": o.timeout,
                }
            )
        if o.kind == "http":
            # The long-poll load holds backend streams/connections only while requests are in
            # flight: connections, ports and memory are sampled during the phase, not at idle.
            r.backend_conns, r.ports_used, rss = 0, 0, 0
            for _ in range(3):
                time.sleep(seconds / 4)
                conns, ports = ss_backend(bport)
                r.backend_conns = max(r.backend_conns, conns)
                r.ports_used = max(r.ports_used, ports)
                rss = max(rss, tree_rss_bytes(service.pid))
            r.rss_mib = rss / 2**20
            r.kib_per_ws = round((r.rss_mib - r.rss_baseline_mib) * 1024 / max(1, still_open), 2)
        deadline = time.monotonic() + seconds + 2 * o.timeout + 60
        latencies: list[float] = []
        for c in clients:
            reply = c.expect("echo", deadline)
            r.phase_late = (r.phase_late or 0) + reply["late"]
            latencies += reply["lat_ms"]
            for value, count in reply.get("hist", {}).items():
                latencies += [float(value)] * count
            for reason, count in reply["errors"].items():
                r.fail(f"{'echo' if o.kind == 'ws' else 'request'}: {reason}", count)
        r.phase_cpu_s = round(tree_cpu_seconds(service.pid) - cpu_before, 2)
        r.loadavg_phase = loadavg()
        if latencies:
            r.echo_p50_ms = round(percentile(latencies, 0.50), 2)
            r.echo_p99_ms = round(percentile(latencies, 0.99), 2)
        r.echo_samples = len(latencies)
        deadline = time.monotonic() + 60
        for c in clients:
            c.send({"cmd": "status"})
        r.open_after = sum(c.expect("status", deadline)["open"] for c in clients)
        r.backend_conns_peak = peak.stop()
        # The proxy's own words (log lines, not clients: one failure may log several lines)
        r.failed["proxy_log_lines"] = log_failures(service)
        if r.proxy_max_fds is not None and r.proxy_max_fds >= o.nofile - 50:
            r.note += f"; a proxy process at the {o.nofile}-descriptor limit ({r.proxy_max_fds})"
        if not service.alive():
            r.note += f"; proxy exited (status {service.proc.returncode})"
        r.note = r.note.strip("; ")
        log(
            f"[{proxy.name}] {o.kind}: p50 {r.echo_p50_ms} ms, p99 {r.echo_p99_ms} ms over "
            f"{r.echo_samples} samples; backend conns {r.backend_conns}, ports "
            f"{r.ports_used}; failed {r.failed}"
        )
    return r


# --------------------------------------------------------------------------- report


def _n(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The README table of one run (rows: the JSON's per-proxy dicts)."""
    lines = [
        "| Proxy | Reached | Failed | Backend conns | Ports used | RSS MiB (baseline) | "
        "KiB per client | Ramp s (CPU-s) | p50 / p99 ms | Note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kinds = ", ".join(f"{k} {v:,}" for k, v in r["failed"]["kinds"].items())
        logged = ", ".join(f"{k} x{v:,}" for k, v in r["failed"].get("proxy_log_lines", {}).items())
        failed = _n(r["failed"]["total"]) + (f" ({kinds})" if kinds else "")
        note = "; ".join(x for x in (r["note"], f"log: {logged}" if logged else "") if x)
        lines.append(
            f"| {r['proxy']} | {_n(r['reached'])} | {failed} | {_n(r['backend_conns'])} | "
            f"{_n(r['ports_used'])} | {_n(r['rss_mib'], '.1f')} "
            f"({_n(r['rss_baseline_mib'], '.1f')}) | {_n(r['kib_per_ws'], '.2f')} | "
            f"{_n(r['ramp_s'], '.1f')} ({_n(r['ramp_cpu_s'], '.1f')}) | "
            f"{_n(r['echo_p50_ms'], '.2f')} / {_n(r['echo_p99_ms'], '.2f')} | "
            f"{note.replace('|', '/')} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def raise_limits() -> dict[str, Any]:
    """Raise what may be raised (the soft fd limit to the hard one) and record the rest."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raised = hard
    with contextlib.suppress(ValueError, OSError):  # needs CAP_SYS_RESOURCE: EPERM here
        resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
        raised = nr_open
    return {
        "nofile": [soft, hard],
        "nofile_used": raised,
        "nr_open": nr_open,
        # Not widened on purpose: the ~28,000 ports towards one ip:port are what is measured.
        "ip_local_port_range": Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    names = [p.name for p in PROXIES]
    parser.add_argument("--n", type=int, default=20_000, help="clients (20000)")
    parser.add_argument("--workers", type=int, default=2, help="muxproxy workers W (2)")
    parser.add_argument("--connections", type=int, default=4, help="muxproxy K per worker (4)")
    parser.add_argument("--proxies", default=",".join(names), help="comma list (all)")
    parser.add_argument("--kind", choices=("ws", "http"), default="ws")
    parser.add_argument("--json", type=Path, required=True, help="output JSON file")
    parser.add_argument(
        "--table", action="store_true", help="print the Markdown table of an existing --json"
    )
    parser.add_argument("--clients-per-process", type=int, default=10_000)
    parser.add_argument("--sources", type=int, default=0, help="127.0.0.2.. (0: N/20000+2)")
    parser.add_argument("--batch", type=int, default=100, help="connects in flight/process")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--echo-sockets", type=int, default=1000)
    parser.add_argument("--echo-seconds", type=float, default=10.0)
    parser.add_argument("--http-seconds", type=float, default=60.0)
    parser.add_argument(
        "--http-rate",
        type=float,
        default=1000.0,
        help="long-poll requests/s from all clients together (1000: what this box's CPU "
        "carries; each client polls every N/rate s)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per connect/echo (10)")
    parser.add_argument(
        "--stall", type=float, default=8.0, help="end the ramp after s without progress (8)"
    )
    parser.add_argument("--ramp-timeout", type=float, default=300.0)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep-tmp", action="store_true")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(list(json.loads(args.json.read_text())["proxies"].values())))
        return 0
    chosen = [p for p in PROXIES if p.name in args.proxies.split(",")]
    unknown = set(args.proxies.split(",")) - set(names)
    if unknown or not chosen:
        parser.error(f"--proxies: among {','.join(names)}")
    limits = raise_limits()
    nofile = limits["nofile_used"]
    if args.clients_per_process > nofile - FD_SLACK:
        parser.error(f"--clients-per-process must stay below the {nofile}-fd limit")
    if math.ceil(args.n / args.workers) > nofile - FD_SLACK:
        log(
            f"warning: {args.n} / {args.workers} workers exceeds the {nofile}-fd limit per "
            "muxproxy worker; raise --workers"
        )
    o = Options(
        n=args.n,
        workers=args.workers,
        connections=args.connections,
        kind=args.kind,
        clients_per_process=args.clients_per_process,
        sources=args.sources or args.n // 20_000 + 2,
        batch=args.batch,
        settle=args.settle,
        echo_sockets=args.echo_sockets if args.kind == "ws" else args.n,
        echo_seconds=args.echo_seconds,
        http_seconds=args.http_seconds,
        http_rate=args.http_rate,
        timeout=args.timeout,
        stall=args.stall,
        ramp_timeout=args.ramp_timeout,
        nofile=nofile,
        python=args.python,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    facts: dict[str, Any] = {
        "command": "python3 bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
        "limits": limits,
        "options": asdict(o),
        "versions": {p.name: p.version(o) for p in chosen},
        "note": "shared 2-core box: other jobs ran at the same time",
    }
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="muxproxy-scale-"))
    status = 0
    began = time.monotonic()
    try:
        with exclusive_machine():
            random.seed()
            for proxy in chosen:
                results.append(bench(proxy, o, root))
                log(f"[{proxy.name}] done: {results[-1].note or 'ok'}")
    except KeyboardInterrupt:
        status = 130
        log("interrupted; partial results")
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    facts["loadavg_at_end"] = loadavg()
    facts["wall_s"] = round(time.monotonic() - began, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"facts": facts, "proxies": {r.proxy: asdict(r) for r in results}}, indent=2)
        + "\n"
    )
    print(markdown([asdict(r) for r in results]))
    log(f"JSON written to {args.json} ({facts['wall_s']} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
