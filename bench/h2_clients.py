#!/usr/bin/env python3
"""HTTP/2 clients (issue 14): h2load through muxproxy, HAProxy, nginx, Caddy and nghttpx.

Usage (Linux, from the repository root, as root like bench/run.py)::

    python3 bench/h2_clients.py                   # all, 10 s cells: -c64 -m10 and -c512 -m1
    python3 bench/h2_clients.py --duration 3      # quick end-to-end check
    python3 bench/h2_clients.py --only muxproxy,haproxy --paths /small

Everything but the client protocol is bench/run.py's, imported from it: the same nginx h2c
backend (`/small` 100 B, `/16k` 16 KiB, pinned to `--load-cpu`), a fresh proxy per cell with
one worker/thread pinned to `--proxy-cpu`, rendered from `bench/conf/h2c-<proxy>.tmpl` (each
accepts h2c with prior knowledge; nginx 1.22 still forwards over HTTP/1.1), the same
smoke test (over h2c, with curl), warm-up, CPU accounting (utime+stime of the proxy's process
tree around the measured window), peak backend connections and RSS, and the same lock, so
runs of this and bench/run.py never overlap.

The load is `h2load -t1 -c<N> -m<M> -D<S>` over h2c (prior knowledge), pinned to the load
CPU; the issue's cells are `-c 64 -m 10` and `-c 512 -m 1` (`--streams`). h2load has no
percentiles, so p50/p99 come from its `--log-file` (one line per request: start, status,
microseconds to the end of the response). Errors: requests h2load counts as errored or
timed out, plus responses with status >= 400. Requests per proxy CPU-second is the figure the
issue's targets are about: at least 0.25x HAProxy's, at least 1x Caddy's, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from run import (
    BODY_SIZES,
    Load,
    Row,
    Settings,
    WrkResult,
    _csv,
    _interrupt,
    add_compare_tree,
    add_quota_arg,
    add_ratios,
    bench_proxy,
    command_output,
    exclusive_machine,
    loadavg,
    log,
    machine_facts,
    markdown_table,
    proxy_specs,
    quota_line,
    quota_problem,
    run_bounded,
    start_backend,
    with_compare_tree,
    write_results,
)

FRONT = "h2c"
STREAMS = {64: 10, 512: 1}  # the cells: -c 64 -m 10, -c 512 -m 1


def percentile(sorted_values: Sequence[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return float(sorted_values[i])


def _count(text: str, pattern: str) -> int:
    match = re.search(pattern, text, re.MULTILINE)
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class H2loadRun:
    """What one h2load run printed, and its per-request log."""

    seconds: float  # "finished in"
    total: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeouts: int
    latencies: list[int]  # µs from each answered request's start to its end, sorted


def run_h2load(argv: Sequence[str], timeout: float, log_file: Path) -> H2loadRun:
    """One bounded h2load run (``argv`` without ``--log-file``)."""
    status, output = run_bounded([*argv[:-1], "--log-file", str(log_file), argv[-1]], timeout)
    finished = re.search(r"^finished in ([\d.]+)(m?s)", output, re.MULTILINE)
    if status != 0 or finished is None:
        raise RuntimeError(f"h2load failed (status {status}): {output[-300:]}")
    latencies: list[int] = []
    with contextlib.suppress(OSError):
        for line in log_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and int(parts[1]) > 0:
                latencies.append(int(parts[2]))
        log_file.unlink()
    latencies.sort()
    return H2loadRun(
        seconds=float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1),
        total=_count(output, r"^requests: (\d+) total"),
        done=_count(output, r"^requests: \d+ total, \d+ started, (\d+) done"),
        succeeded=_count(output, r"(\d+) succeeded"),
        failed=_count(output, r"(\d+) failed"),
        errored=_count(output, r"(\d+) errored"),
        timeouts=_count(output, r"(\d+) timeout"),
        latencies=latencies,
    )


def h2load(streams: Mapping[int, int], workdir: Path) -> Load:
    """A bench/run.py Load: one bounded h2load run, summarised as run.WrkResult."""

    def load(url: str, connections: int, seconds: int, cpu: int) -> WrkResult:
        m = streams.get(connections, 1)
        argv = ["taskset", "-c", str(cpu), "h2load", "-t1", f"-c{connections}", f"-m{m}"]
        run = run_h2load([*argv, f"-D{seconds}", url], seconds + 60, workdir / "requests.tsv")
        return WrkResult(
            requests=run.done,
            duration_s=run.seconds,
            socket_errors=run.errored + run.timeouts,
            status_errors=max(0, run.failed - run.errored),
            p50_ms=percentile(run.latencies, 0.50) / 1000,
            p99_ms=percentile(run.latencies, 0.99) / 1000,
        )

    return load


def facts_markdown(
    facts: Mapping[str, object], settings: Settings, streams: Mapping[int, int]
) -> str:
    versions = facts["versions"]
    assert isinstance(versions, dict)
    avg = facts["loadavg_at_start"]
    assert isinstance(avg, list)
    load = ", ".join(f"`-c{c} -m{streams.get(c, 1)}`" for c in settings.connections)
    lines = [
        f"## muxproxy with HTTP/2 clients (h2c), {facts['date']}",
        "",
        f"- machine: nproc={facts['nproc']}, {facts['cpu_model']}, {facts['kernel']}, "
        f"load average at start {' '.join(avg)}",
        f"- pinning: proxy on CPU {settings.proxy_cpu}{quota_line(settings.proxy_quota)}; "
        f"backend nginx, h2load and this harness on CPU {settings.load_cpu}",
        f"- load: `h2load -t1 -D{settings.duration}` over h2c with {load} on "
        f"{', '.join(settings.paths)}, after a {settings.warmup} s warm-up per cell",
    ]
    lines += [f"- {name}: {version}" for name, version in versions.items() if name != "wrk"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [spec.name for spec in proxy_specs(sys.executable, FRONT)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=int, default=10, help="seconds per cell (10)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per cell (1)")
    parser.add_argument(
        "--streams", type=_csv, default=[f"{c}:{m}" for c, m in STREAMS.items()],
        help="cells as connections:streams (64:10,512:1)",
    )
    parser.add_argument("--paths", type=_csv, default=list(BODY_SIZES), help="/small,/16k")
    parser.add_argument("--only", type=_csv, default=names, help=",".join(names))
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy (0)")
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU for backend and h2load (1)")
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
    try:
        args.streams = {int(c): int(m) for c, m in (cell.split(":") for cell in args.streams)}
    except ValueError:
        parser.error("--streams takes connections:streams pairs, e.g. 64:10,512:1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    specs = [s for s in proxy_specs(args.python, FRONT) if s.name in args.only]
    specs = with_compare_tree(specs, args.python, args.compare_tree, FRONT)
    streams: dict[int, int] = args.streams
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        connections=list(streams),
        paths=args.paths,
        proxy_cpu=args.proxy_cpu,
        load_cpu=args.load_cpu,
        front=FRONT,
        proxy_quota=args.proxy_quota,
    )
    missing = [t for t in ("nginx", "h2load", "curl", "taskset") if shutil.which(t) is None]
    if missing:
        log(f"missing required tools: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.sched_setaffinity(0, {settings.load_cpu})
    with exclusive_machine():
        facts = machine_facts(specs, settings)
        versions = facts["versions"]
        assert isinstance(versions, dict)
        versions["h2load"] = command_output(["h2load", "--version"])
        header = facts_markdown(facts, settings, streams)
        print(header + "\n", flush=True)
        rows: list[Row] = []
        status = 0
        workdir = Path(tempfile.mkdtemp(prefix="muxproxy-bench-h2-"))
        load = h2load(streams, workdir)
        try:
            with contextlib.ExitStack() as stack:
                backend = start_backend(workdir, settings, stack)
                log(f"[backend] nginx h2c on {backend.h2_port}, HTTP/1.1 on {backend.h1_port}")
                for spec in specs:
                    rows.extend(bench_proxy(spec, backend, settings, workdir, load))
        except KeyboardInterrupt:
            status = 130
            log("interrupted; all started processes were stopped")
        except RuntimeError as exc:
            log(str(exc))
            return 1
        finally:
            if args.keep_tmp:
                log(f"configs and logs kept in {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_at_end"] = loadavg()
    add_ratios(rows)
    caddy = {(r.path, r.connections): r.req_per_cpu_s for r in rows if r.proxy == "caddy"}
    table = markdown_table(rows, {spec.name: spec.label for spec in specs})
    vs_caddy = [
        f"{r.path} -c{r.connections}: {r.req_per_cpu_s / base:.2f}x"
        for r in rows
        if r.proxy == "muxproxy" and r.req_per_cpu_s
        and (base := caddy.get((r.path, r.connections)))
    ]
    table += "\n\nmuxproxy vs Caddy per CPU-second: " + ("; ".join(vs_caddy) or "-") + "."
    table += f"\n\nLoad average at end: {' '.join(loadavg())}."
    if status:
        table += " Interrupted: partial results."
    print(table, flush=True)
    path = write_results(facts, rows, header + "\n\n" + table)
    log(f"results written to {path} (and .md)")
    return status


if __name__ == "__main__":
    sys.exit(main())
