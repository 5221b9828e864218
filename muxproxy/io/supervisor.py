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

from ..config import ConfigError, load
from .accesslog import UNLIMITED
from .server import listener_contexts

log = logging.getLogger("muxproxy.supervisor")

READY_TIMEOUT = 30.0
SUPERVISOR_ENV = "MUXPROXY_SUPERVISOR"  # the supervisor's pid, in each worker's environment
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
                "MUXPROXY_WORKER": str(index),
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


def _wait_ready(workers: list[_Worker]) -> str | None:
    """The first worker's ready line once every worker wrote one; None if one died."""
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
        return lines[0]
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
        listener_contexts(load(config))
    except ConfigError as exc:
        log.error("reload failed, workers keep their config: %s: %s", config, exc, extra=UNLIMITED)
        return False
    return True


def supervise(config: Path, loop: str, workers: int, grace: float) -> int:
    stop = False
    passed: list[int] = []  # SIGHUP / SIGUSR1 received, to handle in the loop below

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    def on_pass(signum: int, frame: object) -> None:
        passed.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_pass)
    signal.signal(signal.SIGUSR1, on_pass)
    procs = [_spawn(config, loop, i) for i in range(workers)]
    ready = _wait_ready(procs)
    if ready is None:
        log.error("a worker failed to start")
        for p in procs:
            p.kill()
        return 1
    print(ready, file=sys.stderr, flush=True)
    while not stop:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                log.error("worker %d exited with %s; restarting it", i, p.returncode)
                _close_ready(p)
                procs[i] = _spawn(config, loop, i)
        while passed:
            signum = passed.pop(0)
            if signum == signal.SIGHUP and not _valid(config):
                continue
            for p in procs:
                p.send_signal(signum)
        time.sleep(0.2)  # a supervisor's heartbeat, not a synchronisation
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
