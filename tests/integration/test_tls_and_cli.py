"""TLS h2 to the backend (certificate verified), and the CLI's run/SIGTERM contract."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import trustme

from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin

from .harness import running, wait_for
from .origin import Script

pytestmark = pytest.mark.anyio


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def server_context(authority: trustme.CA, name: str) -> ssl.SSLContext:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(name).configure_cert(ctx)
    return ctx


async def test_tls_h2_backend_with_verified_certificate(ca: tuple[trustme.CA, Path]) -> None:
    authority, ca_path = ca
    tls = f'{{ verify = true, ca = "{ca_path}", server_name = "backend.test" }}'
    async with running(
        Script(),
        origin_tls=server_context(authority, "backend.test"),
        cluster={"tls": tls, "connections": 1},
    ) as h:
        for _ in range(5):
            r = await h.get("/hello")
            assert (r.status, r.body) == (200, b"hello\n")
        assert h.origin.connections_accepted == 1


async def test_tls_backend_with_wrong_name_is_refused(ca: tuple[trustme.CA, Path]) -> None:
    authority, ca_path = ca
    tls = f'{{ verify = true, ca = "{ca_path}", server_name = "other.test" }}'
    async with running(
        Script(),
        origin_tls=server_context(authority, "backend.test"),
        cluster={"tls": tls, "connect_timeout": "2s"},
    ) as h:
        r = await h.get("/hello")
        assert r.status == 503
        assert h.origin.requests_received == 0


@dataclass
class ProxyProcess:
    proc: anyio.abc.Process
    log: bytes  # stderr so far
    host: str
    port: int

    async def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then :meth:`wait_exit`."""
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    async def wait_exit(self, timeout: float = 20) -> int:
        """The rest of stderr, up to the exit; returns the exit status."""
        assert self.proc.stderr is not None
        with anyio.fail_after(timeout):
            while True:
                try:
                    self.log += await self.proc.stderr.receive()
                except anyio.EndOfStream:
                    break
            return await self.proc.wait()


@asynccontextmanager
async def proxy_process(argv: list[str]) -> AsyncIterator[ProxyProcess]:
    """A proxy subprocess, once it printed `ready`; killed on the way out if still running
    (a failed assertion must not leave it behind)."""
    proc = await anyio.open_process(argv, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        log = b""
        with anyio.fail_after(30):
            while b"ready " not in log or b"\n" not in log.split(b"ready ", 1)[1]:
                log += await proc.stderr.receive()  # (up to the end of the ready line)
        line = log.split(b"ready ", 1)[1].split(b"\n", 1)[0].decode()
        assert "=" in line.split(" ")[0], log
        host, _, port = line.split(" ")[0].split("=", 1)[1].rpartition(":")
        yield ProxyProcess(proc, log, host, int(port))
    finally:
        if proc.returncode is None:
            proc.kill()
            with anyio.CancelScope(shield=True):
                await proc.wait()


def test_run_sigterm_drains_in_flight_request(tmp_path: Path) -> None:
    """`muxproxy run` prints `ready`, and SIGTERM lets an in-flight request finish, exit 0."""

    async def scenario() -> None:
        script = Script()
        origin = H2Origin(script)
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
                client = await H1Client.connect(px.host, px.port)
                result: list[int] = []

                async def in_flight() -> None:
                    result.append((await client.request("GET", "/block")).status)

                tg.start_soon(in_flight)
                await wait_for(lambda: bool(script.started))
                px.proc.send_signal(signal.SIGTERM)
                script.release.set()
                assert await px.wait_exit() == 0, px.log
                assert result == [200]
                assert b"Traceback" not in px.log
            tg.cancel_scope.cancel()

    anyio.run(scenario)


async def _two_workers(tmp_path: Path, origin_port: int) -> tuple[list[str], int]:
    """The command line of a `workers = 2` proxy in front of ``origin_port``, and its port
    (fixed: every worker binds it with SO_REUSEPORT)."""
    probe = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listen = probe.extra(anyio.abc.SocketAttribute.local_port)
    await probe.aclose()
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        f'[proxy]\nworkers = 2\n[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:{listen}"\n'
        f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{origin_port}"]\nconnections = 1\n'
        '[[routes]]\ncluster = "app"\n'
    )
    return [sys.executable, "-m", "muxproxy", "run", "-c", str(cfg)], listen


def test_workers_share_the_port_and_drain_on_sigterm(tmp_path: Path) -> None:
    """`workers = 2`: one ready line once both accept; each worker has its own pool."""

    async def scenario() -> None:
        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            argv, listen = await _two_workers(tmp_path, port)
            async with proxy_process(argv) as px:
                for _ in range(20):
                    client = await H1Client.connect("127.0.0.1", listen)
                    assert (await client.request("GET", "/hello")).status == 200
                    await client.aclose()
                await wait_for(lambda: origin.connections_accepted >= 2)
                assert origin.connections_accepted == 2  # 2 workers × connections = 1
                assert await px.stop(30) == 0, px.log
            tg.cancel_scope.cancel()

    anyio.run(scenario)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaper may be slow or absent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed supervisor cannot pass SIGTERM on: the kernel does it (PR_SET_PDEATHSIG),
    so no worker keeps serving as an orphan."""

    async def scenario() -> None:
        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            argv, listen = await _two_workers(tmp_path, port)
            async with proxy_process(argv) as px:
                pid = px.proc.pid
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                workers = [int(c) for c in children]
                assert len(workers) == 2
                client = await H1Client.connect("127.0.0.1", listen)
                assert (await client.request("GET", "/hello")).status == 200
                await client.aclose()
                px.proc.kill()
                await px.proc.wait()
                await wait_for(lambda: not any(_running(w) for w in workers), limit=20)
            tg.cancel_scope.cancel()

    anyio.run(scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_out_of_file_descriptors_pauses_accepting_and_recovers(tmp_path: Path, loop: str) -> None:
    """EMFILE on accept: the proxy stops accepting for a moment instead of spinning or dropping
    the waiting connections, and serves them once descriptors are free again (serve_fast on
    asyncio and uvloop, serve_trio on trio: accept_some decides for both)."""
    limit = 48  # descriptors for the whole proxy process: a few dozen clients at most
    clients_n = 80

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
            launcher = (
                "import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
                f"sys.argv = ['muxproxy', 'run', '-c', {str(cfg)!r}, '--loop', {loop!r}]; "
                "runpy.run_module('muxproxy', run_name='__main__')"
            )
            async with proxy_process([sys.executable, "-c", launcher]) as px:
                clients = [await H1Client.connect(px.host, px.port) for _ in range(clients_n)]
                statuses: list[int] = []

                async def ask(client: H1Client) -> None:
                    statuses.append((await client.request("GET", "/hello")).status)
                    await client.aclose()  # frees a descriptor in the proxy for the next one

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as clients_tg:
                        for client in clients:
                            clients_tg.start_soon(ask, client)
                assert statuses == [200] * clients_n
                assert await px.stop() == 0, px.log
                assert b"accept: Too many open files; pausing" in px.log, px.log
                assert b"Traceback" not in px.log, px.log
            tg.cancel_scope.cancel()

    anyio.run(scenario)
