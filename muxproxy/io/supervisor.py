"""Several worker processes sharing each listen port with SO_REUSEPORT.

``muxproxy run`` with ``[proxy].workers = N > 1`` becomes this supervisor: it starts N
``muxproxy run --worker`` processes (each a whole proxy with its own pools — so a backend sees
``N × connections`` connections), waits until every one accepts, prints one ``ready`` line,
restarts a worker that dies, and on SIGTERM/SIGINT passes the signal on and waits for the
workers' graceful drain.  A worker whose supervisor dies (even by SIGKILL) gets SIGTERM from
the kernel and drains too.  The kernel spreads new client connections across the workers.

SIGHUP: the supervisor validates the file first (one line and nothing else if it is bad) and
then passes SIGHUP to every worker, which reloads in place; then it applies what a worker
cannot (io/reload_scope.py): a new ``workers`` count starts or retires workers, a new ``loop``
replaces the workers one at a time (each new one ready before its predecessor retires), a new
``[admin]`` moves the gathering admin port; ``pid_file`` is one "not applied until a restart"
line.  A retired worker gets SIGUSR2 (a drain that answers each keep-alive client once more,
with ``connection: close``).  SIGUSR1 (reopen the access log) is passed on as is; SIGUSR2 to
the supervisor replaces every worker the same way (new code after an upgrade).

Workers write their access log to the inherited stdout; their ready line comes on a pipe of
its own (``MUXPROXY_READY_FD``).  The admin port belongs to the supervisor
(io/admin_gather.py): each worker serves its own admin endpoints on a private loopback port
(always, so ``[admin]`` can come or move on reload) that it names in its ready line, and the
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

from ..config import Address, Config, ConfigError, load
from .accesslog import UNLIMITED, configure_logging
from .admin_gather import AdminGatherer
from .reload_scope import Action, applied, plan, settings
from .startup import check_loop, check_startup

log = logging.getLogger("muxproxy.supervisor")

READY_TIMEOUT = 30.0
SUPERVISOR_ENV = "MUXPROXY_SUPERVISOR"  # the supervisor's pid, in each worker's environment
WORKER_ENV = "MUXPROXY_WORKER"  # the worker's index
READY_FD_ENV = "MUXPROXY_READY_FD"  # where a worker writes its ready line
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _Worker(subprocess.Popen[bytes]):
    ready: int  # the read end of the worker's ready pipe
    loop: str  # the event loop it runs


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
    proc.loop = loop
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


def _ready_fields(line: str) -> dict[str, str]:
    """``ready edge=127.0.0.1:8080 admin=127.0.0.1:41234`` → {name: address}."""
    return dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)


def supervise(config: Path, cfg: Config, loop_override: str | None = None) -> int:
    """Run ``cfg.proxy.workers`` workers on ``config`` until SIGTERM/SIGINT; the exit status."""
    return Supervisor(config, cfg, loop_override).run()


class Supervisor:
    """The worker processes of one config file, kept to its ``workers`` and ``loop``."""

    def __init__(self, path: Path, cfg: Config, loop_override: str | None) -> None:
        self.path = path
        self.cfg = cfg
        self.loop_override = loop_override  # --loop: proxy.loop in the file is not in force
        self.loop = loop_override or cfg.proxy.loop
        self.in_force = settings(cfg, loop_override)  # workers, loop, admin… as they run
        self.procs: list[_Worker] = []  # by worker index
        self.admin_of: dict[int, str | None] = {}  # worker index → its private admin port
        self.retiring: list[tuple[_Worker, float]] = []  # draining, with a deadline to kill
        self.gatherer: AdminGatherer | None = None
        self.reloads_failed = 0  # refused here: the workers never saw those files
        self.stop = False
        self.passed: list[int] = []  # SIGHUP / SIGUSR1 / SIGUSR2 received, for the loop

    # --- the life of the supervisor ------------------------------------------------------

    def run(self) -> int:
        def on_stop(signum: int, frame: object) -> None:
            self.stop = True

        def on_pass(signum: int, frame: object) -> None:
            self.passed.append(signum)

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_pass)
        signal.signal(signal.SIGUSR1, on_pass)
        signal.signal(signal.SIGUSR2, on_pass)
        if self.cfg.admin is not None:
            self.gatherer = self._gatherer(self.cfg.admin.listen)
        self.procs = [_spawn(self.path, self.loop, i) for i in range(self.cfg.proxy.workers)]
        lines = _wait_ready(self.procs)
        if lines is None:
            log.error("a worker failed to start")
            for p in self.procs:
                p.kill()
            if self.gatherer is not None:
                self.gatherer.close()
            return 1
        for i, line in enumerate(lines):
            self._announced(i, line)
        fields = _ready_fields(lines[0])
        fields.pop("admin", None)  # (worker 0's private one)
        if self.gatherer is not None:
            fields["admin"] = str(self.gatherer.address)
        try:
            sys.stderr.write("ready " + " ".join(f"{k}={v}" for k, v in fields.items()) + "\n")
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        while not self.stop:
            self._reap()
            self._revive()
            while self.passed and not self.stop:
                signum = self.passed.pop(0)
                if signum == signal.SIGHUP:
                    self._reload()
                elif signum == signal.SIGUSR2:
                    self._roll(every=True)
                    log.info("every worker replaced", extra=UNLIMITED)
                else:
                    for p in self.procs:
                        p.send_signal(signum)
            time.sleep(0.2)  # a supervisor's heartbeat, not a synchronisation
        return self._shutdown()

    def _shutdown(self) -> int:
        if self.gatherer is not None:
            self.gatherer.close()
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.proxy.grace_period + 5
        code = 0
        for p in self.procs:
            try:
                code |= p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                code = 1
        for p, _ in self.retiring:  # (drained by a reload; their status is not ours)
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        return 0 if code == 0 else 1

    # --- workers ----------------------------------------------------------------------------

    def _announced(self, index: int, line: str) -> None:
        """A worker is ready: its line names its private admin port, which the gatherer asks."""
        self.admin_of[index] = _ready_fields(line).get("admin")
        self._publish()

    def _publish(self) -> None:
        if self.gatherer is not None:  # (a new dict: the gatherer's thread reads the old one)
            self.gatherer.workers = dict(self.admin_of)

    def _start(self, index: int) -> _Worker | None:
        """A new worker ``index`` on the current file and loop, once it is ready; None (and
        one line) if it did not start."""
        proc = _spawn(self.path, self.loop, index)
        lines = _wait_ready([proc])
        if lines is None:
            log.error("worker %d failed to start", index)
            proc.kill()
            proc.wait()
            return None
        self._announced(index, lines[0])
        return proc

    def _retire(self, proc: _Worker) -> None:
        """Drain a worker without waiting for it: SIGUSR2, a graceful drain (within
        grace_period) in which each keep-alive client is answered once more, with
        ``connection: close``, instead of meeting a close racing its next request."""
        proc.send_signal(signal.SIGUSR2)
        self.retiring.append((proc, time.monotonic() + self.cfg.proxy.grace_period + 5))

    def _reap(self) -> None:
        """Forget the drained workers that exited; kill those past their deadline."""
        now = time.monotonic()
        for item in list(self.retiring):
            proc, deadline = item
            if proc.poll() is not None:
                self.retiring.remove(item)
            elif now > deadline:
                proc.kill()

    def _revive(self) -> None:
        """Restart a worker that died (not one that was drained on purpose)."""
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                log.error("worker %d exited with %s; restarting it", i, p.returncode)
                _close_ready(p)
                self.admin_of[i] = None
                self._publish()
                again = self._start(i)
                if again is not None:
                    self.procs[i] = again

    def _reshape(self, workers: int) -> None:
        """Start the missing workers (on the new file) or drain the surplus."""
        while len(self.procs) < workers and not self.stop:
            proc = self._start(len(self.procs))
            if proc is None:
                return
            self.procs.append(proc)
        while len(self.procs) > workers:
            self._retire(self.procs.pop())
            self.admin_of.pop(len(self.procs), None)
        self._publish()

    def _roll(self, every: bool = False) -> None:
        """Replace every worker that runs another loop (``every``: every worker, SIGUSR2 to
        the supervisor, e.g. after an upgrade), one at a time: the new one is ready before
        the old one drains, so each port always has a worker accepting."""
        for i, old in enumerate(self.procs):
            if (old.loop == self.loop and not every) or self.stop:
                continue
            new = self._start(i)
            if new is None:
                return
            self.procs[i] = new
            self._retire(old)

    # --- reload -----------------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: validate, move the admin port if it changed (the last thing that can fail),
        let every worker reload, then reshape or roll the workers as reload_scope says."""
        try:
            new = load(self.path)
            check_startup(new)  # the whole check (config and certificate files)
            if self.loop_override is None:
                check_loop(new.proxy.loop, "proxy.loop")
        except ConfigError as exc:
            self._failed(exc)
            return
        changes = plan(self.in_force, new, "supervisor", self.loop_override)
        actions = {c.action for c in changes}
        gatherer = self.gatherer
        if Action.REBIND in actions:
            try:
                gatherer = self._gatherer(new.admin.listen) if new.admin is not None else None
            except ConfigError as exc:
                self._failed(exc)
                return
        for p in self.procs:
            p.send_signal(signal.SIGHUP)
        self.cfg = new
        self.loop = self.loop_override or new.proxy.loop
        if gatherer is not self.gatherer:
            if self.gatherer is not None:
                self.gatherer.close()
            self.gatherer = gatherer
            self._publish()
        if Action.RELOG in actions:
            configure_logging(new.proxy.log_format, logging.root.level)
        if Action.RESHAPE in actions:
            self._reshape(new.proxy.workers)
        if Action.ROLL in actions:
            self._roll()
        for change in changes:  # (once done: a line says what now runs)
            level = logging.WARNING if change.action is Action.RESTART else logging.INFO
            log.log(level, "%s", change.line(), extra=UNLIMITED)
        self.in_force = applied(self.in_force, changes)

    def _gatherer(self, listen: Address) -> AdminGatherer:
        """The admin port on ``listen`` (ConfigError if it cannot be bound)."""
        gatherer = AdminGatherer(listen, 0)
        gatherer.own = self._metrics
        return gatherer

    def _metrics(self) -> str:
        """The supervisor's own series, for the gathered /metrics."""
        return (
            "# HELP muxproxy_supervisor_reloads_failed_total Reloads the supervisor refused "
            "(bad file, admin port taken): no worker saw them.\n"
            "# TYPE muxproxy_supervisor_reloads_failed_total counter\n"
            f"muxproxy_supervisor_reloads_failed_total {self.reloads_failed}\n"
        )

    def _failed(self, exc: ConfigError) -> None:
        self.reloads_failed += 1
        log.error(
            "reload failed, workers keep their config: %s: %s", self.path, exc, extra=UNLIMITED
        )
