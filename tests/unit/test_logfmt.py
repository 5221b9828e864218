"""Access-log lines (core/logfmt.py), the writer thread and the repeat filter (io/accesslog.py)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from muxproxy.core.logfmt import access_json, access_text, event_json, event_text, iso_time
from muxproxy.core.outcome import Outcome
from muxproxy.io.accesslog import AccessLog, RepeatFilter


def full() -> Outcome:
    o = Outcome(1733330000.25, 100.0, "edge")
    o.client_addr, o.client_port = "127.0.0.9", 51234
    o.protocol, o.method, o.authority, o.path = "HTTP/1.1", "GET", "api.test", "/v1/x?y=1"
    o.status, o.bytes_in, o.bytes_out = 200, 12, 345
    o.queue_s, o.upstream_s, o.end = 0.001, 0.0125, 100.0375
    o.route, o.cluster, o.backend = "api.test/v1", "api", "127.0.0.1:9000"
    o.backend_conn, o.stream_id, o.replays, o.request_id = 3, 17, 1, "abc-123"
    return o


def test_iso_time_is_utc_with_milliseconds() -> None:
    assert iso_time(1733330000.25) == "2024-12-04T16:33:20.250Z"


def test_json_line_has_every_field_typed() -> None:
    line = access_json(full())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    d = json.loads(line)
    assert d == {
        "time": "2024-12-04T16:33:20.250Z",
        "client": "127.0.0.9",
        "client_port": 51234,
        "peer": "",
        "listener": "edge",
        "protocol": "HTTP/1.1",
        "method": "GET",
        "authority": "api.test",
        "path": "/v1/x?y=1",
        "status": 200,
        "bytes_in": 12,
        "bytes_out": 345,
        "duration_s": 0.0375,
        "queue_s": 0.001,
        "upstream_s": 0.0125,
        "route": "api.test/v1",
        "cluster": "api",
        "backend": "127.0.0.1:9000",
        "backend_conn": 3,
        "stream_id": 17,
        "replays": 1,
        "reason": "",
        "detail": "",
        "request_id": "abc-123",
    }


def test_json_sentinels_for_phases_that_never_happened() -> None:
    o = Outcome(1733330000.0, 5.0, "edge", status=400, reason="refused_malformed")
    d = json.loads(access_json(o))
    assert d["duration_s"] is None and d["queue_s"] is None and d["upstream_s"] is None
    assert d["status"] == 400 and d["reason"] == "refused_malformed"


def test_json_escapes_hostile_text() -> None:
    o = full()
    o.path = '/a"b\\c\x01'
    o.detail = "line\nbreak"
    d = json.loads(access_json(o))
    assert d["path"] == '/a"b\\c\x01' and d["detail"] == "line\nbreak"


def test_text_line() -> None:
    line = access_text(full()).decode()
    assert line == (
        '2024-12-04T16:33:20.250Z 127.0.0.9:51234 edge "GET api.test /v1/x?y=1 HTTP/1.1" 200 '
        "in=12 out=345 duration=0.037500 queue=0.001000 upstream=0.012500 route=api.test/v1 "
        "cluster=api backend=127.0.0.1:9000 conn=3 stream=17 replays=1 reason=- "
        "request_id=abc-123\n"
    )


def test_text_line_dashes_and_escapes() -> None:
    o = Outcome(1733330000.0, 5.0, "edge", status=404, reason="no_route")
    o.path = '/x y"\n'
    o.detail = "no route"
    line = access_text(o).decode()
    assert line.count("\n") == 1
    assert '"- - /x\\x20y\\x22\\x0a -" 404' in line
    assert "duration=- queue=- upstream=-" in line
    assert line.endswith("reason=no_route request_id=- detail=no\\x20route\n")


def test_event_lines() -> None:
    d = json.loads(event_json(1733330000.0, "WARNING", "muxproxy.pool", 'a "b"', 3))
    assert d == {
        "time": "2024-12-04T16:33:20.000Z",
        "level": "WARNING",
        "logger": "muxproxy.pool",
        "message": 'a "b"',
        "repeated": 3,
    }
    assert "repeated" not in json.loads(event_json(0.0, "INFO", "x", "m"))
    assert event_text(0.0, "INFO", "x", "m", 2) == (
        "1970-01-01T00:00:00.000Z INFO x: m (repeated 2 more times)"
    )


def _record(msg: str, created: float, name: str = "muxproxy.pool") -> logging.LogRecord:
    r = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, ("x",), None)
    r.created = created
    return r


def test_repeat_filter_holds_back_repeats_and_counts_them() -> None:
    f = RepeatFilter(window=10.0)
    assert f.filter(_record("cluster %s: down", 100.0))
    assert not f.filter(_record("cluster %s: down", 101.0))
    assert not f.filter(_record("cluster %s: down", 102.0))
    assert f.filter(_record("other %s", 102.0))  # another template is another event
    later = _record("cluster %s: down", 111.0)
    assert f.filter(later)
    assert later.repeated == 2  # type: ignore[attr-defined]


def test_writer_appends_lines_to_a_file_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    alog = AccessLog(str(path), "json", 100)
    try:
        alog(full())
        _wait(lambda: alog.written == 1)
        os.rename(path, tmp_path / "access.log.1")
        alog(full())  # no reopen asked: still the renamed file
        _wait(lambda: alog.written == 2)
        alog.reopen()
        _wait(lambda: path.exists())
        alog(full())
        _wait(lambda: alog.written == 3)
    finally:
        alog.close()
    assert len((tmp_path / "access.log.1").read_bytes().splitlines()) == 2
    assert len(path.read_bytes().splitlines()) == 1


def test_writer_on_a_pipe_nobody_reads_drops_and_counts(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        alog = AccessLog(f"/dev/fd/{w}", "json", 10)
        n = 2000  # ~500 bytes each: far more than the pipe (64 KiB) and the buffer (10)
        for _ in range(n):
            alog(full())  # never blocks: this loop finishing is the point
        assert alog.dropped >= n // 2  # the pipe took ~64 KiB, the buffer 10 lines
        assert alog.statistics()["access_log_dropped"] == alog.dropped
    finally:
        os.close(r)  # the writer's blocked write fails (EPIPE); it stops
        alog.close()
        os.close(w)


def test_writer_batches_stay_whole_lines_on_a_pipe() -> None:
    r, w = os.pipe()
    alog = AccessLog(f"/dev/fd/{w}", "text", 10_000)
    got = bytearray()
    n = 300

    def reader() -> None:
        while got.count(b"\n") < n:
            got.extend(os.read(r, 65536))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(n):
        alog(full())
    t.join(20)
    alog.close()
    os.close(r)
    os.close(w)
    lines = bytes(got).splitlines()
    assert len(lines) == n and all(line == lines[0] for line in lines)


def _wait(predicate: object, limit: float = 10.0) -> None:
    """Bounded wait for the writer thread (an event in another thread, not a fixed sleep)."""
    ev = threading.Event()
    for _ in range(int(limit / 0.005)):
        if predicate():  # type: ignore[operator]
            return
        ev.wait(0.005)
    raise AssertionError("condition not met in time")


def test_repeat_filter_never_holds_back_an_answer_to_an_operator() -> None:
    f = RepeatFilter(window=10.0)
    for t in (100.0, 101.0):
        r = _record("reload failed: %s", t)
        r.unlimited = True  # what extra=UNLIMITED sets
        assert f.filter(r)
