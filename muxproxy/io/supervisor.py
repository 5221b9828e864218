"""Several worker processes sharing each listen port with SO_REUSEPORT.

``muxproxy run`` with ``[proxy].workers = N > 1`` becomes this supervisor: it starts N
``muxproxy run --worker`` processes (each a whole proxy with its own pools — so a backend sees
``N × connections`` connections), waits until every one accepts, prints one ``ready`` line,
restarts a worker that dies, and on SIGTERM/SIGINT passes the signal on and waits for the
workers' graceful drain.  SIGHUP: the supervisor validates the file first (one line and
nothing else if it is bad) and then passes SIGHUP to every worker, which reloads in place;
SIGUSR1 (reopen the access log) is passed on as is.  Workers write their access log to the
inherited stdout; their ready line comes on a pipe of its own (``MUXPROXY_READY_FD``).
A worker whose supervisor dies (even by SIGKILL) gets SIGTERM from
the kernel and drains too.  The kernel spreads new client connections across the workers.

The admin port belongs to the supervisor (io/admin_gather.py): each worker serves its own
admin endpoints on a private loopback port that it names in its ready line (on the ready
pipe, ``MUXPROXY_READY_FD``), and the
supervisor answers a scrape of the configured ``[admin].listen`` by asking every worker and
labelling each series with ``worker="N"`` — one scrape sees every worker.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import Address, ConfigError, load
from .accesslog import UNLIMITED
from .admin_gather import AdminGatherer
from .startup import check_startup

log = logging.getLogger("muxproxy.supervisor")

READY_TIMEOUT = 30.0
SUPERVISOR_ENV = "MUXPROXY_SUPERVISOR"  # the supervisor's pid, in each worker's environment
WORKER_ENV = "MUXPROXY_WORKER"  # the worker's index
READY_FD_ENV = "MUXPROXY_READY_FD"  # where a worker writes its ready line
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _Worker(subprocess.Popen[bytes]):
    ready: int  # the read end of the worker's ready pipe


def _spawn(config: Path, loop: str, index: int) -> _Worker:
    r, w = os.pipe()
    try:
        proc = _Worker(
            [
                sys.executable,
                "-m",
                "muxproxy",
                "run",
                "-c",
                str(config),
                "--loop",
                loop,
                "--worker",
            ],
            pass_fds=(w,),
            env={
                **os.environ,
                WORKER_ENV: str(index),
                SUPERVISOR_ENV: str(os.getpid()),
                READY_FD_ENV: str(w),
            },
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    proc.ready = r
    return proc


def die_with_supervisor() -> None:
    """In a worker: exit (gracefully, through SIGTERM) when the supervisor dies, even by
    SIGKILL, instead of serving on as an orphan nobody will stop.  Linux only (prctl)."""
    parent = os.environ.get(SUPERVISOR_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _wait_ready(workers: list[_Worker]) -> list[str] | None:
    """Every worker's ready line (from its ready pipe) once each wrote one; None if one
    died.  The pipes are closed after."""
    sel = selectors.DefaultSelector()
    for i, w in enumerate(workers):
        sel.register(w.ready, selectors.EVENT_READ, i)
    lines: dict[int, str] = {}
    got: dict[int, bytes] = {}
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while len(lines) < len(workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for key, _ in sel.select(remaining):
                i = key.data
                data = os.read(workers[i].ready, 4096)
                if not data:
                    return None
                got[i] = got.get(i, b"") + data
                if got[i].endswith(b"\n"):
                    lines[i] = got[i].decode(errors="replace").strip()
                    sel.unregister(key.fileobj)
        return [lines[i] for i in range(len(workers))]
    finally:
        sel.close()
        for w in workers:
            _close_ready(w)


def _close_ready(w: _Worker) -> None:
    if w.ready >= 0:
        os.close(w.ready)
        w.ready = -1


def _valid(config: Path) -> bool:
    """SIGHUP: the whole check (config and certificate files) before any worker reloads."""
    try:
        check_startup(load(config))
    except ConfigError as exc:
        log.error("reload failed, workers keep their config: %s: %s", config, exc, extra=UNLIMITED)
        return False
    return True


def _ready_fields(line: str) -> dict[str, str]:
    """``ready edge=127.0.0.1:8080 admin=127.0.0.1:41234`` → {name: address}."""
    return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)


def supervise(
    config: Path, loop: str, workers: int, grace: float, admin: Address | None = None
) -> int:
    stop = False
    passed: list[int] = []  # SIGHUP / SIGUSR1 received, to handle in the loop below

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    def on_pass(signum: int, frame: object) -> None:
        passed.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gatherer = AdminGatherer(admin, workers) if admin is not None else None
    signal.signal(signal.SIGHUP, on_pass)
    signal.signal(signal.SIGUSR1, on_pass)
    procs = [_spawn(config, loop, i) for i in range(workers)]
    lines = _wait_ready(procs)
    if lines is None:
        log.error("a worker failed to start")
        for p in procs:
            p.kill()
        if gatherer is not None:
            gatherer.close()
        return 1
    fields = _ready_fields(lines[0])
    if gatherer is not None:
        for i, line in enumerate(lines):
            gatherer.workers[i] = _ready_fields(line).get("admin")
        fields["admin"] = str(gatherer.address)
    print("ready " + " ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr, flush=True)
    while not stop:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                log.error("worker %d exited with %s; restarting it", i, p.returncode)
                _close_ready(p)
                if gatherer is not None:
                    gatherer.workers[i] = None
                procs[i] = _spawn(config, loop, i)
                again = _wait_ready([procs[i]])
                if gatherer is not None and again is not None:
                    gatherer.workers[i] = _ready_fields(again[0]).get("admin")
        while passed:
            signum = passed.pop(0)
            if signum == signal.SIGHUP and not _valid(config):
                continue
            for p in procs:
                p.send_signal(signum)
        time.sleep(0.2)  # a supervisor's heartbeat, not a synchronisation
    if gatherer is not None:
        gatherer.close()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    code = 0
    for p in procs:
        try:
            code |= p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            code = 1
    return 0 if code == 0 else 1
