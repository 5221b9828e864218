"""Reload under load, with `muxproxy run` as a subprocess and real clients: 200 clients loop
requests for 20 s and 50 WebSockets echo while the config is reloaded 10 times (a valid file
with a new route, then an invalid one, in turn).  Nothing may fail, no WebSocket on the
unchanged cluster may drop, and each new route is served within 1 s of the signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin

from .test_tls_and_cli import ProxyProcess, proxy_process
from .ws_origin import WSScript
from .wsclient import WSClient

CLIENTS = 200
WEBSOCKETS = 50
SECONDS = 20.0
RELOADS = 10


def config(origin: int, generation: int, *, valid: bool = True, pid_file: Path) -> str:
    """Cluster "app" never changes; "extra" changes at every reload (its old pool drains),
    and its route's host names the generation."""
    routes = (
        f'[[routes]]\nhost = "gen{generation}.test"\ncluster = "extra"\n'
        '[[routes]]\nhost = "app.test"\ncluster = "app"\nwebsocket = true\n'
    )
    if not valid:
        routes = routes.replace('cluster = "extra"', 'cluster = "missing"')
    return (
        f'[proxy]\npid_file = "{pid_file}"\naccess_log = "off"\n'
        '[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:0"\n'
        "[listeners.limits]\nmax_connections = 1000\n"
        f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{origin}"]\nconnections = 2\n'
        'pending_timeout = "30s"\n'
        f'[[clusters]]\nname = "extra"\nbackends = ["127.0.0.1:{origin}"]\n'
        f"connections = {1 + generation % 3}\n" + routes
    )


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_reload_ten_times_under_load_drops_nothing(tmp_path: Path, loop: str) -> None:
    async def scenario() -> None:
        script = WSScript()
        origin = H2Origin(script, connect_protocol=True, max_concurrent_streams=1000)
        path = tmp_path / "proxy.toml"
        pid_file = tmp_path / "muxproxy.pid"
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            path.write_text(config(port, 0, pid_file=pid_file))
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(path), "--loop", loop]
            async with proxy_process(argv) as px:
                assert int(pid_file.read_text()) == px.proc.pid
                await _under_load(px, port, path, pid_file, tg)
                assert await px.stop(30) == 0, px.log
            assert not pid_file.exists()
            tg.cancel_scope.cancel()

    anyio.run(scenario)


async def _under_load(
    px: ProxyProcess, origin: int, path: Path, pid_file: Path, tg: anyio.abc.TaskGroup
) -> None:
    ok = 0
    failed: list[str] = []
    echoes = 0
    dropped: list[str] = []
    stop = anyio.Event()

    async def client() -> None:
        nonlocal ok
        c = await H1Client.connect(px.host, px.port)
        try:
            while not stop.is_set():
                r = await c.request("GET", "/hello", host="app.test")
                if r.status == 200:
                    ok += 1
                else:
                    failed.append(f"{r.status} {r.body[:80]!r}")
        except Exception as exc:  # a dropped connection is a failed request
            failed.append(repr(exc))
        finally:
            await c.aclose()

    async def websocket(i: int) -> None:
        nonlocal echoes
        ws = await WSClient.connect(px.host, px.port)
        try:
            n = 0
            while not stop.is_set():
                await ws.send(f"{i}:{n}")
                if await ws.receive() != f"{i}:{n}":
                    dropped.append(f"ws {i}: wrong echo")
                    return
                echoes += 1
                n += 1
                await anyio.sleep(0.05)  # an echo every 50 ms per socket: pacing, not syncing
            await ws.close()
        except Exception as exc:
            dropped.append(f"ws {i}: {exc!r}")

    async def stderr() -> None:
        assert px.proc.stderr is not None
        async for chunk in px.proc.stderr:
            px.log += chunk

    async with anyio.create_task_group() as outer:
        outer.start_soon(stderr)
        with anyio.fail_after(SECONDS + 60):
            async with anyio.create_task_group() as load:
                for i in range(WEBSOCKETS):
                    load.start_soon(websocket, i)
                for _ in range(CLIENTS):
                    load.start_soon(client)
                started = anyio.current_time()
                for n in range(1, RELOADS + 1):
                    await _reload(px, origin, path, pid_file, n)
                    await anyio.sleep(SECONDS / RELOADS * 0.8)  # spread over the run (pacing)
                await anyio.sleep(max(0.0, SECONDS - (anyio.current_time() - started)))
                stop.set()  # every client ends its loop; the group waits for them
        outer.cancel_scope.cancel()
    print(f"requests ok={ok} failed={len(failed)} echoes={echoes} ws_dropped={len(dropped)}")
    assert failed == [], failed[:5]
    assert dropped == [], dropped[:5]
    assert ok > CLIENTS and echoes > WEBSOCKETS
    assert px.log.count(b"reload failed") == RELOADS // 2
    assert px.log.count(b"reloaded ") == RELOADS // 2


async def _reload(px: ProxyProcess, origin: int, path: Path, pid_file: Path, n: int) -> None:
    """Odd n: a valid file with a new route, by `muxproxy reload`, served within 1 s.
    Even n: an invalid file by SIGHUP: one failure line, and the old route still served."""
    valid = n % 2 == 1
    path.write_text(config(origin, n, valid=valid, pid_file=pid_file))
    if valid:
        assert not await _served(px, f"gen{n}.test")
        await _reload_command(path)
        with anyio.fail_after(1.0):  # the new route within 1 s of the signal
            while not await _served(px, f"gen{n}.test"):
                await anyio.sleep(0.01)
    else:
        failures = px.log.count(b"reload failed")
        px.proc.send_signal(signal.SIGHUP)
        with anyio.move_on_after(10):
            while px.log.count(b"reload failed") == failures:
                await anyio.sleep(0.01)
        assert px.log.count(b"reload failed") > failures, px.log[-3000:]
        assert await _served(px, f"gen{n - 1}.test")  # the old config stays
        assert not await _served(px, f"gen{n}.test")


async def _served(px: ProxyProcess, host: str) -> bool:
    c = await H1Client.connect(px.host, px.port)
    try:
        return (await c.request("GET", "/hello", host=host)).status == 200
    finally:
        await c.aclose()


async def _reload_command(path: Path) -> None:
    """`muxproxy reload -c FILE`: validate, then SIGHUP the pid in pid_file."""
    result = await anyio.run_process(
        [sys.executable, "-m", "muxproxy", "reload", "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_workers_supervisor_validates_then_reloads_every_worker(tmp_path: Path) -> None:
    """`workers = 2`: a bad file stops at the supervisor (one line, no worker touched); a good
    one reaches both workers (every new connection, whichever worker takes it, sees it)."""

    async def scenario() -> None:
        origin = H2Origin(WSScript())
        path = tmp_path / "proxy.toml"
        pid_file = tmp_path / "muxproxy.pid"
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            probe = await anyio.create_tcp_listener(local_host="127.0.0.1")
            listen = probe.extra(anyio.abc.SocketAttribute.local_port)
            await probe.aclose()

            def write(n: int, valid: bool) -> None:
                text = config(port, n, valid=valid, pid_file=pid_file)
                text = text.replace("127.0.0.1:0", f"127.0.0.1:{listen}")
                path.write_text("[proxy]\nworkers = 2\n" + text.replace("[proxy]\n", ""))

            write(0, True)
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(path)]
            async with proxy_process(argv) as px:
                write(1, False)
                px.proc.send_signal(signal.SIGHUP)
                assert px.proc.stderr is not None
                with anyio.fail_after(10):
                    while b"workers keep their config" not in px.log:
                        px.log += await px.proc.stderr.receive()
                write(2, True)
                await _reload_command(path)
                with anyio.fail_after(10):
                    streak = 0
                    while streak < 20:  # 20 new connections in a row: both workers reloaded
                        streak = streak + 1 if await _served(px, "gen2.test") else 0
                assert await px.stop(30) == 0, px.log
            assert px.log.count(b"reload failed") == 1
            tg.cancel_scope.cancel()

    anyio.run(scenario)
