"""The access-log writer, and the same format for every other log line.

:class:`AccessLog` is a recorder (``proxy.recorders``): on the event loop it turns each
finished :class:`~muxproxy.core.outcome.Outcome` into one line (core/logfmt.py) and appends it
to a bounded deque — no syscall, no lock.  A writer thread takes everything queued, joins it
and writes it with one ``os.write`` per batch (at most ``PIPE_BUF`` bytes on a pipe, so lines
from several workers never interleave), so a slow disk or a pipe nobody reads never blocks
the loop: when ``access_log_buffer`` lines are waiting, new lines are dropped and counted
(``dropped``).  :meth:`reopen` (SIGUSR1, reload) makes the writer reopen a file before its
next write: logrotate renames the file, signals, and the next line lands in a new one.

:func:`configure_logging` gives the other log lines the same format (``log_format``) and a
filter that rate-limits repeated events: the same message template from the same logger
within ``REPEAT_WINDOW`` seconds is counted, not printed, and the next one printed says how
many were suppressed.  Lines that answer an operator's action (a reload) pass with
``extra=UNLIMITED``.
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable

from ..config import ProxyConfig
from ..core.logfmt import access_json, access_text, event_json, event_text
from ..core.outcome import Outcome

__all__ = ["UNLIMITED", "AccessLog", "RepeatFilter", "configure_logging"]

log = logging.getLogger("muxproxy.accesslog")

PIPE_BATCH = 4096  # PIPE_BUF on Linux: a write this size to a pipe is atomic
FILE_BATCH = 256 * 1024
REPEAT_WINDOW = 10.0
UNLIMITED = {"unlimited": True}  # ``log.error(..., extra=UNLIMITED)``: never rate-limited


class AccessLog:
    """One destination (``stdout``, ``stderr`` or a path) and its writer thread."""

    def __init__(self, destination: str, log_format: str = "json", buffer: int = 10_000) -> None:
        self.destination = destination
        self.format: Callable[[Outcome], bytes] = (
            access_text if log_format == "text" else access_json
        )
        self.limit = buffer
        self.lines: collections.deque[bytes] = collections.deque()
        self.written = 0  # lines written (by the writer thread)
        self.dropped = 0  # lines dropped because the buffer was full (counted on the loop)
        self.lost = 0  # lines the writer could not write (counted on the writer thread)
        self.write_errors = 0
        self._fd = -1
        self._owned = False  # a file we opened (and close), not stdout/stderr
        self._reopen = True
        self._stop = False
        self._idle = True  # the writer is waiting (read without the lock: a hint)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="muxproxy-accesslog", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: ProxyConfig) -> AccessLog | None:
        if cfg.access_log == "off":
            return None
        return cls(cfg.access_log, cfg.log_format, cfg.access_log_buffer)

    def reconfigure(self, cfg: ProxyConfig) -> None:
        """A reload: take the new format and destination and reopen (even if unchanged)."""
        self.format = access_text if cfg.log_format == "text" else access_json
        self.limit = cfg.access_log_buffer
        self.destination = cfg.access_log
        self.reopen()

    # --- on the event loop ---------------------------------------------------------------

    def __call__(self, outcome: Outcome) -> None:
        """Record one outcome: format it and queue it; never blocks, never raises."""
        lines = self.lines
        if len(lines) >= self.limit:
            self.dropped += 1
            return
        lines.append(self.format(outcome))
        if self._idle:
            self._wake()

    def reopen(self) -> None:
        """Reopen the destination before the next write (logrotate's SIGUSR1)."""
        self._reopen = True
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._idle = False
            self._cond.notify()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most ``timeout``) and stop the writer."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def statistics(self) -> dict[str, int]:
        return {
            "access_log_written": self.written,
            "access_log_dropped": self.dropped + self.lost,
            "access_log_queued": len(self.lines),
            "access_log_write_errors": self.write_errors,
        }

    # --- on the writer thread ------------------------------------------------------------

    def _run(self) -> None:
        lines = self.lines
        while True:
            with self._cond:
                # Idle is announced before the check: a line appended after the check sees it
                # and notifies (under the lock, so not before this thread waits).
                self._idle = True
                while not lines and not self._stop and not self._reopen:
                    self._cond.wait(1.0)
                self._idle = False
                stop = self._stop
            if self._reopen:
                self._open()
            if lines:
                self._drain()
            if stop and not lines:
                break
        if self._owned:
            os.close(self._fd)

    def _open(self) -> None:
        self._reopen = False
        old, owned = self._fd, self._owned
        dest = self.destination
        try:
            if dest == "stdout":
                fd, own = sys.stdout.fileno(), False
            elif dest == "stderr":
                fd, own = sys.stderr.fileno(), False
            else:
                fd, own = os.open(dest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), True
        except (OSError, ValueError) as exc:
            self.write_errors += 1
            log.error("access_log: cannot open %s: %s", dest, exc)
            return
        self._fd, self._owned = fd, own
        if owned and old != fd:
            os.close(old)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        self._batch = FILE_BATCH if regular else PIPE_BATCH

    def _drain(self) -> None:
        lines = self.lines
        batch = self._batch if self._fd >= 0 else 0
        while lines:
            parts: list[bytes] = []
            size = 0
            while lines and (not parts or size + len(lines[0]) <= batch):
                line = lines.popleft()
                parts.append(line)
                size += len(line)
            if self._fd < 0:
                self.lost += len(parts)
                continue
            data = b"".join(parts)
            try:
                while data:
                    n = os.write(self._fd, data)
                    data = data[n:]
            except OSError as exc:
                self.write_errors += 1
                self.lost += len(parts)
                if self.write_errors == 1 or self.write_errors % 1000 == 0:
                    log.error("access_log: cannot write to %s: %s", self.destination, exc)
                continue
            self.written += len(parts)

    _batch = PIPE_BATCH


class RepeatFilter(logging.Filter):
    """Rate-limit repeated events: the same logger and message template at most once per
    ``window`` seconds; the next one printed carries ``repeated`` (how many were held back)."""

    def __init__(self, window: float = REPEAT_WINDOW, max_keys: int = 1024) -> None:
        super().__init__()
        self.window = window
        self.max_keys = max_keys
        self._seen: dict[tuple[str, str, int], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "unlimited", False):  # an operator's action: always answered
            return True
        key = (record.name, str(record.msg), record.levelno)
        now = record.created
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) >= self.max_keys:
            self._seen.clear()  # bounded: forgetting only costs a line printed twice
        self._seen[key] = (now, 0)
        record.repeated = last[1] if last is not None else 0
        return True


class _Formatter(logging.Formatter):
    def __init__(self, json: bool) -> None:
        super().__init__()
        self.line = event_json if json else event_text

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return self.line(
            record.created,
            record.levelname,
            record.name,
            message,
            getattr(record, "repeated", 0),
        )


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Every log line (not the access log) on stderr in ``log_format``, repeats rate-limited."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(log_format == "json"))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
