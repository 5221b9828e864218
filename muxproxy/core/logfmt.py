"""Access-log and log lines as bytes: one JSON object or one text line per event.

Theory of operation: the I/O layer hands a finished :class:`~muxproxy.core.outcome.Outcome`
to :func:`access_json` or :func:`access_text` and gets one newline-terminated line back; the
other log lines (pool events, errors) go through :func:`event_json` / :func:`event_text`, so
an operator parses one format.  Building a line is one dict (JSON, encoded by msgspec) or one
f-string (text); nothing here writes, buffers or reads a clock — the wall-clock time is the
Outcome's own ``wall_start`` or a value passed in.

Sentinels: in JSON a phase that never happened (``queue_s``/``upstream_s``/``duration_s`` of
``-1``) is ``null`` and a field that does not apply is ``""``/``0`` as in the Outcome; in text
both are ``-``.  ``status`` 0 means no response was sent to the client.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from .outcome import Outcome

__all__ = ["access_json", "access_text", "event_json", "event_text", "iso_time"]

_encode = msgspec.json.Encoder().encode


_second = [-1, ""]  # the last whole second formatted, and its text: one datetime a second


def iso_time(wall: float) -> str:
    """``1733330000.123`` → ``2024-12-04T16:33:20.123Z`` (UTC, milliseconds)."""
    sec = int(wall)
    if sec != _second[0]:
        _second[0], _second[1] = sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{int((wall - sec) * 1000):03d}Z"


def _dur(seconds: float) -> float | None:
    return round(seconds, 6) if seconds >= 0 else None


def access_json(o: Outcome) -> bytes:
    """One JSON object (typed values) and a newline."""
    return (
        _encode(
            {
                "time": iso_time(o.wall_start),
                "client": o.client_addr,
                "client_port": o.client_port,
                "peer": o.peer_addr,
                "listener": o.listener,
                "protocol": o.protocol,
                "method": o.method,
                "authority": o.authority,
                "path": o.path,
                "status": o.status,
                "bytes_in": o.bytes_in,
                "bytes_out": o.bytes_out,
                "duration_s": _dur(o.total_s),
                "queue_s": _dur(o.queue_s),
                "upstream_s": _dur(o.upstream_s),
                "route": o.route,
                "cluster": o.cluster,
                "backend": o.backend,
                "backend_conn": o.backend_conn,
                "stream_id": o.stream_id,
                "replays": o.replays,
                "reason": o.reason,
                "detail": o.detail,
                "request_id": o.request_id,
            }
        )
        + b"\n"
    )


def _t(value: str) -> str:
    """A text field: ``-`` when empty; no space, quote or control character survives."""
    if not value:
        return "-"
    if value.isprintable() and " " not in value and '"' not in value:
        return value
    return "".join(c if c.isprintable() and c not in ' "\\' else f"\\x{ord(c):02x}" for c in value)


def _td(seconds: float) -> str:
    return f"{seconds:.6f}" if seconds >= 0 else "-"


def access_text(o: Outcome) -> bytes:
    """One line, space-separated, ``key=value`` after the request line (nginx/HAProxy-like)."""
    client = f"{o.client_addr}:{o.client_port}" if o.client_addr else "-"
    return (
        f"{iso_time(o.wall_start)} {client} {_t(o.listener)} "
        f'"{_t(o.method)} {_t(o.authority)} {_t(o.path)} {_t(o.protocol)}" {o.status} '
        f"in={o.bytes_in} out={o.bytes_out} duration={_td(o.total_s)} queue={_td(o.queue_s)} "
        f"upstream={_td(o.upstream_s)} route={_t(o.route)} cluster={_t(o.cluster)} "
        f"backend={_t(o.backend)} conn={o.backend_conn} stream={o.stream_id} "
        f"replays={o.replays} reason={_t(o.reason)} request_id={_t(o.request_id)}"
        f"{' peer=' + _t(o.peer_addr) if o.peer_addr else ''}"
        f"{' detail=' + _t(o.detail) if o.detail else ''}\n"
    ).encode("utf-8", "replace")


def event_json(wall: float, level: str, logger: str, message: str, repeated: int = 0) -> str:
    """A non-access log line (pool event, error) as one JSON object, without newline.
    ``repeated``: how many identical events were suppressed before this one."""
    event: dict[str, object] = {
        "time": iso_time(wall),
        "level": level,
        "logger": logger,
        "message": message,
    }
    if repeated:
        event["repeated"] = repeated
    return _encode(event).decode()


def event_text(wall: float, level: str, logger: str, message: str, repeated: int = 0) -> str:
    """The same as text, without newline: ``time LEVEL logger: message``."""
    more = f" (repeated {repeated} more times)" if repeated else ""
    return f"{iso_time(wall)} {level} {logger}: {message}{more}"
