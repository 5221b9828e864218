"""The access log through the proxy: one JSON line per request, refused requests included,
logrotate's SIGUSR1, and a destination that does not drain."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from muxproxy.demo.h1client import H1Client
from muxproxy.io.accesslog import AccessLog

from .harness import Harness, running, wait_for
from .origin import Script
from .test_tls_and_cli import proxy_process

pytestmark = pytest.mark.anyio


def attach(h: Harness, path: Path, buffer: int = 10_000) -> AccessLog:
    alog = AccessLog(str(path), "json", buffer)
    h.proxy.attach_access_log(alog)
    return alog


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


async def test_one_json_line_per_request_with_the_right_fields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    async with running(Script()) as h:
        alog = attach(h, path)
        c = await h.client()
        r = await c.request("GET", "/hello?x=1", host="api.test")
        assert r.status == 200
        await wait_for(lambda: alog.written == 1)
        local = c.stream.extra(anyio.abc.SocketAttribute.local_address)
        await c.aclose()
        alog.close()
    [d] = lines(path)
    assert d["method"] == "GET" and d["path"] == "/hello?x=1" and d["authority"] == "api.test"
    assert d["status"] == 200 and d["reason"] == ""
    assert d["protocol"] == "HTTP/1.1" and d["listener"] == "edge"
    assert (d["client"], d["client_port"]) == tuple(local[:2])
    assert d["cluster"] == "app" and d["route"] == "routes[0]"
    assert d["duration_s"] is not None and d["duration_s"] >= 0
    assert d["time"].endswith("Z")


async def test_404_and_400_are_logged_with_reason_codes(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    routes = '[[routes]]\nhost = "app.test"\ncluster = "app"\n'
    async with running(Script(), routes=routes) as h:
        alog = attach(h, path)
        r = await h.get("/hello", host="nowhere.test")
        assert r.status == 404
        raw = await h.raw(b"GET /x HTTP/1.1\r\nHost: app.test\r\nBad Name: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400")
        raw = await h.raw(b"GET /x HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n")
        assert raw.startswith(b"HTTP/1.1 431")
        await wait_for(lambda: alog.written == 3)
        alog.close()
    d404, d400, d431 = lines(path)
    assert (d404["status"], d404["reason"], d404["authority"]) == (404, "no_route", "nowhere.test")
    assert (d400["status"], d400["reason"]) == (400, "refused_malformed")
    assert d400["detail"]
    assert (d431["status"], d431["reason"]) == (431, "refused_limit")


async def test_a_destination_that_does_not_drain_drops_lines_not_requests() -> None:
    """A pipe nobody reads: the writer blocks, the loop does not; lines are dropped, counted."""
    r, w = os.pipe()
    alog = AccessLog(f"/dev/fd/{w}", "json", 20)
    try:
        async with running(Script()) as h:
            h.proxy.attach_access_log(alog)
            n = 400  # ~400 bytes a line: the pipe holds ~160, the buffer 20
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(_loop, h, n // 4)
            assert alog.dropped > 0
            assert h.proxy.reload_statistics()["access_log_dropped"] >= alog.dropped
    finally:
        os.close(r)  # the writer's blocked write fails (EPIPE): it can stop
        alog.close()
        os.close(w)


async def _loop(h: Harness, n: int) -> None:
    c = await h.client()
    for _ in range(n):
        assert (await c.request("GET", "/hello")).status == 200
    await c.aclose()


def test_sigusr1_reopens_a_rotated_file(tmp_path: Path) -> None:
    """logrotate: rename the file, SIGUSR1, and the next line goes to a new file."""
    from muxproxy.demo.h2server import H2Origin

    async def scenario() -> None:
        origin = H2Origin(Script())
        path = tmp_path / "access.log"
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            cfg = tmp_path / "proxy.toml"
            cfg.write_text(
                f'[proxy]\naccess_log = "{path}"\nlog_format = "text"\n'
                '[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\n'
                f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
                '[[routes]]\ncluster = "app"\n'
            )
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(cfg)]
            async with proxy_process(argv) as px:
                client = await H1Client.connect(px.host, px.port)
                assert (await client.request("GET", "/hello?first")).status == 200
                await wait_for(lambda: b"/hello?first" in _read(path))
                path.rename(tmp_path / "access.log.1")
                px.proc.send_signal(signal.SIGUSR1)
                await wait_for(path.exists)  # the writer reopened (O_CREAT)
                assert (await client.request("GET", "/hello?second")).status == 200
                await wait_for(lambda: b"/hello?second" in _read(path))
                await client.aclose()
                assert await px.stop() == 0, px.log
            tg.cancel_scope.cancel()
        old = _read(tmp_path / "access.log.1")
        assert old.count(b"\n") == 1 and b"/hello?first" in old
        new = _read(path)
        assert new.count(b"\n") == 1 and b'"GET localhost /hello?second HTTP/1.1" 200 ' in new

    anyio.run(scenario)


def test_access_lines_on_stdout_by_default_and_the_ready_line_still_works(
    tmp_path: Path,
) -> None:
    """Default access_log = "stdout": the harness finds `ready` (stderr), lines go to stdout."""
    from muxproxy.demo.h2server import H2Origin

    async def scenario() -> None:
        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            cfg = tmp_path / "proxy.toml"
            cfg.write_text(
                '[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\n'
                f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
                '[[routes]]\ncluster = "app"\n'
            )
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(cfg)]
            async with proxy_process(argv) as px:
                c = await H1Client.connect(px.host, px.port)
                assert (await c.request("GET", "/hello")).status == 200
                await c.aclose()
                assert px.proc.stdout is not None
                out = b""
                with anyio.fail_after(10):
                    while b"\n" not in out:
                        out += await px.proc.stdout.receive()
                d = json.loads(out.split(b"\n")[0])
                assert d["path"] == "/hello" and d["status"] == 200
                assert await px.stop() == 0, px.log
            tg.cancel_scope.cancel()
        # the other log lines are JSON on stderr too
        for line in px.log.splitlines():
            if not line.startswith(b"ready "):
                assert json.loads(line)["logger"].startswith("muxproxy")

    anyio.run(scenario)


def test_access_lines_on_stderr_in_text(tmp_path: Path) -> None:
    """access_log = "stderr": the access lines join the other log lines, stdout stays empty."""
    from muxproxy.demo.h2server import H2Origin

    async def scenario() -> None:
        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            cfg = tmp_path / "proxy.toml"
            cfg.write_text(
                '[proxy]\naccess_log = "stderr"\nlog_format = "text"\n'
                '[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\n'
                f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
                '[[routes]]\ncluster = "app"\n'
            )
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(cfg)]
            async with proxy_process(argv) as px:
                c = await H1Client.connect(px.host, px.port)
                assert (await c.request("GET", "/hello?on-stderr")).status == 200
                await c.aclose()
                assert await px.stop() == 0, px.log
                assert px.proc.stdout is not None
                out = b""
                with anyio.fail_after(10):
                    try:
                        while True:
                            out += await px.proc.stdout.receive()
                    except anyio.EndOfStream:
                        pass
                assert out == b""
            tg.cancel_scope.cancel()
        lines = [ln for ln in px.log.splitlines() if b"/hello?on-stderr" in ln]
        assert len(lines) == 1, px.log
        assert b'"GET localhost /hello?on-stderr HTTP/1.1" 200 ' in lines[0]

    anyio.run(scenario)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


async def test_reload_reopens_moves_and_turns_the_access_log_off(tmp_path: Path) -> None:
    from muxproxy.config import loads

    from .harness import config_text

    async with running(Script()) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        first, second = tmp_path / "a.log", tmp_path / "b.log"

        def cfg(dest: str) -> Any:
            return loads(f'[proxy]\naccess_log = "{dest}"\n' + config_text([f"127.0.0.1:{port}"]))

        h.proxy.attach_access_log(None)  # as the CLI does with access_log = "off"
        await h.proxy.reload(cfg(str(first)))
        assert (await h.get("/hello?1")).status == 200
        await wait_for(lambda: len(lines(first)) == 1)
        await h.proxy.reload(cfg(str(second)))
        assert (await h.get("/hello?2")).status == 200
        await wait_for(lambda: len(lines(second)) == 1)
        await h.proxy.reload(cfg("off"))
        # (the metrics recorder stays: only the access log unsubscribed)
        assert h.proxy.access_log is None and h.proxy.recorders == [h.proxy.metrics.observe]
        assert (await h.get("/hello?3")).status == 200
    assert [d["path"] for d in lines(first) + lines(second)] == ["/hello?1", "/hello?2"]
