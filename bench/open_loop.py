#!/usr/bin/env python3
"""Open-loop latency (issue 17.5): requests arrive at a fixed rate, whatever the proxy answers.

Usage (Linux, from the repository root, as root like bench/run.py)::

    python3 bench/open_loop.py                      # muxproxy, HAProxy, nginx on /small
    python3 bench/open_loop.py --only muxproxy --duration 4 --loads 0.5,0.8

A closed-loop load (wrk, h2load -D) sends the next request only when the previous one is
answered, so a slow proxy slows its own load down and hides its queueing (coordinated
omission). Here the load is `h2load --h1 --rate`: h2load opens connections on a fixed
schedule (`-r` per `--rate-period` of 10 ms) whatever the proxy does, each connection makes
`--per-connection` requests (default 1: every arrival is independent of every response), so
queueing shows up as latency, not as a lower request rate.

For each proxy, in one run, on the same nginx h2c backend as bench/run.py (imported from it:
one worker each, the proxy pinned to `--proxy-cpu`, backend nginx and h2load to `--load-cpu`):

1. **Saturation**: h2load offers `--probe-rate` requests per second (more than any of the
   proxies takes here), then 1.25x what completed; the better completion rate of the two is
   the proxy's saturation in this mode.
   When the load CPU is the one at 100 % (HAProxy and nginx here), that figure is the load
   side's limit, and the table says so.
2. One fresh proxy instance per load point (`--loads`, fractions of its saturation): offered
   rate, achieved rate, p50/p99/p99.9 of h2load's per-request times (`--log-file`: from the
   request's start on its connection to the end of the response), errors, proxy CPU.

Output: a Markdown table on stdout and in `bench/results/open-loop-<date>.md` with the raw
numbers as JSON beside it; with matplotlib installed (`pip install matplotlib`; not a
dependency of muxproxy) a plot of p50/p99/p99.9 against offered load,
`bench/results/open-loop-<date>.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from h2_clients import H2loadRun, percentile, run_h2load
from run import (
    BODY_SIZES,
    CONF_DIR,
    RESULTS_DIR,
    Backend,
    Service,
    Settings,
    _csv,
    _interrupt,
    busy_fraction,
    command_output,
    core_jiffies,
    exclusive_machine,
    loadavg,
    log,
    machine_facts,
    proxy_specs,
    running_proxy,
    start_backend,
    tree_cpu_seconds,
)

PERIOD_MS = 10  # h2load --rate-period: connections start in small groups every 10 ms
DEFAULT_PROXIES = ["muxproxy", "haproxy-reuse", "nginx"]
DEFAULT_LOADS = [0.2, 0.35, 0.5, 0.65, 0.8, 0.9]
BUSY = 0.95  # a CPU this busy is the bottleneck
PROBE_AGAIN = 1.25  # the second saturation probe offers this times what the first achieved


@dataclass
class Point:
    proxy: str
    load: float  # fraction of saturation offered (1.0 for the probe itself)
    offered_rps: float
    achieved_rps: float = 0.0
    requests: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    proxy_cpu_util: float = 0.0
    load_core_busy: float = 0.0
    note: str = ""


def open_loop(
    url: str, rate: float, seconds: float, per_connection: int, cpu: int, log_file: Path
) -> H2loadRun:
    """One h2load run offering ``rate`` requests/s for ``seconds``."""
    per_period = max(1, round(rate / per_connection * PERIOD_MS / 1000))
    clients = max(1, round(per_period * seconds * 1000 / PERIOD_MS))
    argv = ["taskset", "-c", str(cpu), "h2load", "--h1", "-t1", f"-r{per_period}"]
    argv += [f"--rate-period={PERIOD_MS}ms", f"-c{clients}", f"-n{clients * per_connection}"]
    return run_h2load([*argv, "-m1", url], seconds + 120, log_file)


def measure(
    spec_name: str,
    proxy: Service,
    backend: Backend,
    url: str,
    load: float,
    rate: float,
    args: argparse.Namespace,
    workdir: Path,
) -> Point:
    point = Point(proxy=spec_name, load=load, offered_rps=rate)
    seconds = args.probe_seconds if load == 1.0 else args.duration
    cpu0 = tree_cpu_seconds(proxy.pid)
    core = core_jiffies(args.load_cpu)
    try:
        run = open_loop(
            url, rate, seconds, args.per_connection, args.load_cpu, workdir / "requests.tsv"
        )
    except (RuntimeError, OSError) as exc:
        point.note = str(exc).splitlines()[0][:200]
        return point
    taken, latencies = run.seconds, run.latencies
    point.proxy_cpu_util = (tree_cpu_seconds(proxy.pid) - cpu0) / taken if taken else 0.0
    point.load_core_busy = busy_fraction(core, core_jiffies(args.load_cpu))
    point.requests = run.done
    point.errors = run.total - run.succeeded  # failed, errored, timed out or never sent
    point.achieved_rps = run.done / taken if taken else 0.0
    point.p50_ms = percentile(latencies, 0.50) / 1000
    point.p99_ms = percentile(latencies, 0.99) / 1000
    point.p999_ms = percentile(latencies, 0.999) / 1000
    if point.load_core_busy >= BUSY:
        point.note = f"load CPU {point.load_core_busy:.0%} busy"
    if not proxy.alive():
        point.note = f"proxy exited (status {proxy.proc.returncode})"
    return point


def bench(
    spec_name: str, backend: Backend, settings: Settings, args: argparse.Namespace, workdir: Path
) -> list[Point]:
    specs = {s.name: s for s in proxy_specs(args.python)}
    spec = specs[spec_name]
    own = f"open-{spec.template}"  # (HAProxy: a reason phrase, which h2load --h1 needs)
    if (CONF_DIR / own).exists():
        spec = replace(spec, template=own)
    proxy_dir = workdir / spec.name
    proxy_dir.mkdir()
    points: list[Point] = []

    def one(load: float, rate: float, tag: str) -> Point:
        with running_proxy(spec, backend, settings, proxy_dir, tag) as (proxy, port):
            url = f"http://127.0.0.1:{port}{args.path}"
            log(f"[{spec.name}] {tag}: offering {rate:,.0f} req/s")
            point = measure(spec.name, proxy, backend, url, load, rate, args, workdir)
        log(
            f"[{spec.name}] {tag}: {point.achieved_rps:,.0f} req/s, p99 {point.p99_ms:.1f} ms, "
            f"{point.errors} errors {point.note}"
        )
        return point

    # Far past saturation the load side drowns too (h2load opening 40,000 connections a
    # second takes its CPU), so probe again just past what completed, and keep the best.
    probe = one(1.0, args.probe_rate, "saturation")
    closer = one(1.0, PROBE_AGAIN * probe.achieved_rps, "saturation-2")
    probe = max(probe, closer, key=lambda p: p.achieved_rps)
    points.append(probe)
    saturation = probe.achieved_rps
    if saturation <= 0:
        return points
    for load in args.loads:
        points.append(one(load, load * saturation, f"load-{round(load * 100)}"))
    return points


def markdown(points: Sequence[Point], labels: dict[str, str]) -> str:
    lines = [
        "| Proxy | Load | Offered req/s | Achieved req/s | p50 ms | p99 ms | p99.9 ms | Errors "
        "| Proxy CPU | Load CPU | Note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        load = "saturation" if p.load == 1.0 else f"{p.load:.0%}"
        lines.append(
            f"| {labels.get(p.proxy, p.proxy)} | {load} | {p.offered_rps:,.0f} "
            f"| {p.achieved_rps:,.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {p.p999_ms:.2f} "
            f"| {p.errors} | {p.proxy_cpu_util:.0%} | {p.load_core_busy:.0%} | {p.note} |"
        )
    return "\n".join(lines)


def plot(points: Sequence[Point], labels: dict[str, str], title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for proxy in dict.fromkeys(p.proxy for p in points):
        mine = sorted(
            (p for p in points if p.proxy == proxy and p.load < 1.0), key=lambda p: p.load
        )
        if not mine:
            continue
        label = labels.get(proxy, proxy)
        xs = [p.offered_rps for p in mine]
        line = axes[0].plot(xs, [p.p99_ms for p in mine], marker="o", label=f"{label} p99")[0]
        axes[0].plot(xs, [p.p50_ms for p in mine], ls=":", color=line.get_color(), label="p50")
        axes[0].plot(xs, [p.p999_ms for p in mine], ls="--", color=line.get_color(), label="p99.9")
        loads = [p.load * 100 for p in mine]
        axes[1].plot(loads, [p.p99_ms for p in mine], marker="o", label=label)
    axes[0].set_xlabel("offered load, requests/s")
    axes[1].set_xlabel("offered load, % of the proxy's own saturation")
    for ax, where in zip(axes, ("lower right", "upper left"), strict=True):
        ax.set_ylabel("latency, ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc=where)
    axes[0].set_title("p50 (dotted), p99, p99.9 (dashed)")
    axes[1].set_title("p99")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [s.name for s in proxy_specs(sys.executable)]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", type=_csv, default=DEFAULT_PROXIES, help=",".join(names))
    parser.add_argument("--path", default="/small", choices=list(BODY_SIZES))
    parser.add_argument("--duration", type=float, default=8, help="seconds per load point (8)")
    parser.add_argument("--probe-seconds", type=float, default=4, help="saturation probe (4)")
    parser.add_argument(
        "--probe-rate", type=float, default=40000, help="req/s offered by the probe (40000)"
    )
    parser.add_argument(
        "--loads", type=lambda s: [float(x) for x in _csv(s)], default=DEFAULT_LOADS,
        help="fractions of saturation (0.2,0.35,0.5,0.65,0.8,0.9)",
    )
    parser.add_argument("--per-connection", type=int, default=1, help="requests per conn (1)")
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--python", default=sys.executable, help="interpreter for muxproxy")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--replot", type=Path, metavar="JSON", help="only redraw the plot of an earlier run"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown proxy: {', '.join(unknown)}")
    if any(not 0 < x < 1 for x in args.loads):
        parser.error("--loads are fractions between 0 and 1")
    return args


def replot(path: Path) -> int:
    data = json.loads(path.read_text())
    points = [Point(**p) for p in data["points"]]
    versions = data["facts"]["versions"]
    labels = {s.name: s.label for s in proxy_specs(sys.executable) if s.name in versions}
    title = f"open loop, {data['facts']['settings']['paths'][0]}, {data['facts']['date']}"
    return 0 if plot(points, labels, title, path.with_suffix(".png")) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    specs = [s for s in proxy_specs(args.python) if s.name in args.only]
    settings = Settings(
        duration=int(args.duration),
        warmup=0,
        connections=[],
        paths=[args.path],
        proxy_cpu=args.proxy_cpu,
        load_cpu=args.load_cpu,
    )
    missing = [t for t in ("nginx", "h2load", "curl", "taskset") if shutil.which(t) is None]
    if missing:
        log(f"missing required tools: {', '.join(missing)}")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.sched_setaffinity(0, {args.load_cpu})
    points: list[Point] = []
    status = 0
    with exclusive_machine():
        facts = machine_facts(specs, settings)
        versions = facts["versions"]
        assert isinstance(versions, dict)
        versions["h2load"] = command_output(["h2load", "--version"])
        workdir = Path(tempfile.mkdtemp(prefix="muxproxy-bench-open-"))
        try:
            with contextlib.ExitStack() as stack:
                backend = start_backend(workdir, settings, stack)
                for spec in specs:
                    points.extend(bench(spec.name, backend, settings, args, workdir))
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
    labels = {s.name: s.label for s in specs}
    date = str(facts["date"])
    header = [
        f"## Open-loop latency, {date}",
        "",
        f"- machine: nproc={facts['nproc']}, {facts['cpu_model']}, {facts['kernel']}, "
        f"load average at start {' '.join(facts['loadavg_at_start'])}",  # type: ignore[arg-type]
        f"- pinning: proxy on CPU {args.proxy_cpu}; backend nginx, h2load and this harness on "
        f"CPU {args.load_cpu}",
        f"- load: `h2load --h1 -t1 -r<N> --rate-period={PERIOD_MS}ms -m1`, "
        f"{args.per_connection} request(s) per connection, {args.path}, "
        f"{args.duration:g} s per point; saturation: {args.probe_rate:,.0f} req/s offered "
        f"for {args.probe_seconds:g} s",
    ]
    header += [f"- {name}: {v}" for name, v in versions.items() if name != "wrk"]
    text = "\n".join(header) + "\n\n" + markdown(points, labels)
    text += f"\n\nLoad average at end: {' '.join(loadavg())}."
    if status:
        text += " Interrupted: partial results."
    print(text, flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"open-loop-{dt.datetime.now():%Y%m%d-%H%M%S}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps({"facts": facts, "points": [asdict(p) for p in points]}, indent=2) + "\n"
    )
    if plot(points, labels, f"open loop, {args.path}, {date}", stem.with_suffix(".png")):
        log(f"plot: {stem.with_suffix('.png')}")
    log(f"results written to {stem}.md (and .json)")
    return status


if __name__ == "__main__":
    sys.exit(main())
