"""Reload and the keys that shape the process (io/reload_scope.py), with `muxproxy run` as a
subprocess: a single process names each key it cannot apply in one line and moves [admin]
itself; a supervisor starts or drains workers for a new `workers`, replaces them one at a
time for a new `loop` (and every one on SIGUSR2), and moves its admin port, while clients
keep being served: no request fails."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import anyio.to_thread
from prometheus_client.parser import text_string_to_metric_families

from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin

from .origin import Script
from .test_ops_cli import free_port, scrape
from .test_tls_and_cli import ProxyProcess, proxy_process


def config(origin: int, listen: int, proxy: str = "", admin: int | None = None) -> str:
    text = f'[proxy]\naccess_log = "off"\n{proxy}\n'
    if admin is not None:
        text += f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
    return text + (
        f'[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:{listen}"\n'
        f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{origin}"]\nconnections = 1\n'
        '[[routes]]\ncluster = "app"\n'
    )


async def workers_up(admin: int) -> dict[str, float]:
    """muxproxy_worker_up by worker, from one scrape of the supervisor's admin port."""
    status, text = await anyio.to_thread.run_sync(scrape, admin)
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["worker"]: s.value for s in fams["muxproxy_worker_up"].samples}


async def refused(port: int) -> bool:
    try:
        await anyio.to_thread.run_sync(scrape, port)
    except OSError:
        return True
    return False


async def hup_and_wait(px: ProxyProcess, marker: bytes, count: int = 1) -> None:
    """SIGHUP, then read stderr until ``marker`` has been logged ``count`` times more."""
    before = px.log.count(marker)
    px.proc.send_signal(signal.SIGHUP)
    assert px.proc.stderr is not None
    with anyio.fail_after(60):
        while px.log.count(marker) < before + count:
            px.log += await px.proc.stderr.receive()


def children(pid: int) -> list[list[str]]:
    """The command lines of a process's children (Linux /proc)."""
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            out.append(Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0"))
        except OSError:
            pass  # exited meanwhile
    return out


def pids(pid: int) -> set[str]:
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def open_files(pid: str) -> set[str]:
    """The paths a process has open (Linux /proc)."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            pass  # closed meanwhile
    return out


def test_single_process_names_each_key_it_cannot_apply_and_moves_admin(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            origin = await tg.start(H2Origin(Script()).serve)
            listen, admin, admin2 = free_port(), free_port(), free_port()
            path = tmp_path / "proxy.toml"
            path.write_text(config(origin, listen, admin=admin))
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(path)]
            async with proxy_process(argv) as px:
                assert (await anyio.to_thread.run_sync(scrape, admin, "/healthz"))[0] == 200
                path.write_text(
                    config(
                        origin,
                        listen,
                        'workers = 2\nloop = "trio"\n'
                        f'pid_file = "{tmp_path / "new.pid"}"\n',
                        admin=admin2,
                    )
                )
                await hup_and_wait(px, b"not applied until a restart", 3)
                for key, old, new in (
                    ("proxy.workers", "1", "2"),
                    ("proxy.loop", "asyncio", "trio"),
                    ("proxy.pid_file", "none", str(tmp_path / "new.pid")),
                ):
                    line = f"{key}: {old} -> {new}: not applied until a restart".encode()
                    assert px.log.count(line) == 1, px.log.decode()
                # [admin] is applied in place: the new port answers, the old one is closed.
                assert (await anyio.to_thread.run_sync(scrape, admin2, "/healthz"))[0] == 200
                assert await refused(admin)
                # Still the one process, on its first loop, serving.
                assert children(px.proc.pid) == []
                c = await H1Client.connect("127.0.0.1", listen)
                assert (await c.request("GET", "/hello")).status == 200
                await c.aclose()
                assert await px.stop(30) == 0, px.log
            tg.cancel_scope.cancel()

    anyio.run(scenario)


def test_supervisor_reshapes_rolls_and_moves_admin_while_serving(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            origin = await tg.start(H2Origin(Script()).serve)
            listen, admin, admin2 = free_port(), free_port(), free_port()
            path = tmp_path / "proxy.toml"
            path.write_text(config(origin, listen, "workers = 2", admin=admin))
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(path)]
            async with proxy_process(argv) as px:
                assert await workers_up(admin) == {"0": 1.0, "1": 1.0}
                # Refused by the supervisor (a bad file; an admin port that is taken): one
                # line each, counted in the gathered /metrics, no worker touched.
                path.write_text(config(origin, listen, "workers = 0", admin=admin))
                await hup_and_wait(px, b"reload failed, workers keep their config")
                with socket.socket() as taken:
                    taken.bind(("127.0.0.1", 0))
                    taken.listen(1)
                    path.write_text(
                        config(origin, listen, "workers = 3", admin=taken.getsockname()[1])
                    )
                    await hup_and_wait(px, b"reload failed, workers keep their config")
                status, text = await anyio.to_thread.run_sync(scrape, admin)
                assert status == 200
                fams = {f.name: f for f in text_string_to_metric_families(text)}
                assert fams["muxproxy_supervisor_reloads_failed"].samples[0].value == 2
                assert len(children(px.proc.pid)) == 2
                failed: list[str] = []
                ok = 0
                phase = "start"
                stop = anyio.Event()

                async def client() -> None:
                    """Keep-alive requests in a loop through every change; like any HTTP
                    client, a new connection when an answer said `connection: close`."""
                    nonlocal ok
                    fresh = True
                    c = await H1Client.connect("127.0.0.1", listen)
                    try:
                        while not stop.is_set():
                            r = await c.request("GET", "/hello")
                            if r.status == 200:
                                ok += 1
                            else:
                                failed.append(str(r.status))
                            fresh = False
                            if r.header(b"connection") == b"close":
                                await c.aclose()
                                c = await H1Client.connect("127.0.0.1", listen)
                                fresh = True
                    except Exception as exc:
                        failed.append(f"{phase} fresh={fresh} {exc!r}")
                    finally:
                        await c.aclose()

                async with anyio.create_task_group() as load:
                    for _ in range(10):
                        load.start_soon(client)
                    # workers 2 → 3 and [admin] moved: one more worker, one admin port, gathered
                    phase = "grow"
                    path.write_text(config(origin, listen, "workers = 3", admin=admin2))
                    await hup_and_wait(px, b"proxy.workers: 2 -> 3: workers started or drained")
                    assert await workers_up(admin2) == {"0": 1.0, "1": 1.0, "2": 1.0}
                    assert await refused(admin)
                    assert len(children(px.proc.pid)) == 3
                    # workers 3 → 2 and the loop: the surplus drains, the rest are replaced
                    phase = "roll"
                    path.write_text(
                        config(origin, listen, 'workers = 2\nloop = "trio"', admin=admin2)
                    )
                    await hup_and_wait(px, b"proxy.loop: asyncio -> trio")
                    with anyio.fail_after(60):
                        while True:
                            procs = children(px.proc.pid)
                            if len(procs) == 2 and all("trio" in p for p in procs):
                                break
                            await anyio.sleep(0.1)  # (drained workers exit on their own)
                        while await workers_up(admin2) != {"0": 1.0, "1": 1.0}:
                            await anyio.sleep(0.1)
                    # SIGUSR2 to the supervisor: every worker replaced (new code, same file)
                    phase = "usr2"
                    before = pids(px.proc.pid)
                    px.proc.send_signal(signal.SIGUSR2)
                    with anyio.fail_after(60):
                        while len(now := pids(px.proc.pid)) != 2 or now & before:
                            await anyio.sleep(0.1)  # (drained workers exit on their own)
                    stop.set()
                assert failed == [], (len(failed), ok, failed[:5])
                assert ok > 10
                assert b"not applied until a restart" not in px.log, px.log.decode()
                assert await px.stop(30) == 0, px.log
            tg.cancel_scope.cancel()

    anyio.run(scenario)


def test_supervisor_passes_sigusr1_on_every_worker_reopens_the_access_log(tmp_path: Path) -> None:
    """logrotate with workers: rename the file, SIGUSR1 to the supervisor, and every worker's
    next line lands in the new file."""

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            origin = await tg.start(H2Origin(Script()).serve)
            listen = free_port()
            log = tmp_path / "access.log"
            path = tmp_path / "proxy.toml"
            text = config(origin, listen, "workers = 2").replace(
                'access_log = "off"', f'access_log = "{log}"\nlog_format = "text"'
            )
            path.write_text(text)
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(path)]

            async def requests(tag: str, n: int = 40) -> None:
                for i in range(n):  # new connections: the kernel spreads them over both
                    c = await H1Client.connect("127.0.0.1", listen)
                    assert (await c.request("GET", f"/hello?{tag}{i}")).status == 200
                    await c.aclose()

            def lines(p: Path, tag: str) -> int:
                return p.read_text().count(f"/hello?{tag}") if p.exists() else 0

            async with proxy_process(argv) as px:
                await requests("before")
                with anyio.fail_after(10):
                    while lines(log, "before") < 40:
                        await anyio.sleep(0.05)  # (the writer thread's pace)
                log.rename(tmp_path / "access.log.1")
                px.proc.send_signal(signal.SIGUSR1)
                with anyio.fail_after(10):
                    while not all(str(log) in open_files(w) for w in pids(px.proc.pid)):
                        await anyio.sleep(0.05)  # (each worker's writer reopens on its own)
                await requests("after")
                with anyio.fail_after(10):
                    while lines(log, "after") < 40:
                        await anyio.sleep(0.05)
                assert await px.stop(30) == 0, px.log
            tg.cancel_scope.cancel()
        assert lines(tmp_path / "access.log.1", "after") == 0
        assert lines(tmp_path / "access.log.1", "before") == 40

    anyio.run(scenario)
