"""DNS-based backend discovery against a real DNS server: dnsmasq on a loopback port, whose
hosts file the test rewrites (and reloads with SIGHUP) while requests keep flowing."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import pytest
import sniffio

from muxproxy.config import ConfigError, loads
from muxproxy.demo.h2server import H2Origin

from .harness import running, wait_for
from .origin import Script

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq not installed"),
]

NAME = "app.test"


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


class Dnsmasq:
    def __init__(self, process: anyio.abc.Process, port: int, hosts: Path) -> None:
        self.process = process
        self.port = port
        self.hosts = hosts

    def publish(self, *ips: str) -> None:
        """Make NAME resolve to ``ips`` (none: NXDOMAIN) from now on."""
        self.hosts.write_text("".join(f"{ip} {NAME}\n" for ip in ips))
        self.process.send_signal(signal.SIGHUP)  # dnsmasq re-reads --addn-hosts on SIGHUP

    async def answers(self) -> list[str]:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 1.0
        try:
            backend = dns.asyncbackend.get_backend(sniffio.current_async_library())
            answer = await resolver.resolve(NAME, "A", backend=backend)
            return sorted(rr.address for rr in answer)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []


@asynccontextmanager
async def dnsmasq(tmp_path: Path, *ips: str) -> AsyncIterator[Dnsmasq]:
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{ip} {NAME}\n" for ip in ips))
    port = free_port()
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts}",
        "--local-ttl=0",
        "--local=/test/",  # authoritative for .test: unknown names get NXDOMAIN
        f"--pid-file={tmp_path / 'dnsmasq.pid'}",
        f"--user={getpass.getuser()}",  # it re-reads the hosts file from the test's tmp dir
        "--log-facility=-",
    ]
    async with await anyio.open_process(argv) as process:
        server = Dnsmasq(process, port, hosts)
        try:
            with anyio.fail_after(10):  # until it answers (it binds after parsing options)
                while True:
                    try:
                        if await server.answers() == sorted(ips):
                            break
                    except dns.exception.DNSException:
                        pass
                    await anyio.sleep(0.02)
            yield server
        finally:
            if process.returncode is None:
                process.terminate()


async def test_zero_failed_requests_while_the_backend_set_changes(tmp_path: Path) -> None:
    a_script, b_script = Script(), Script()
    a, b = H2Origin(a_script), H2Origin(b_script)
    statuses: list[int] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(a.serve, "127.0.0.2")
        await tg.start(b.serve, "127.0.0.3", port)
        async with (
            dnsmasq(tmp_path, "127.0.0.2") as dns_server,
            running(
                Script(),
                backends=[f"{NAME}:{port}"],
                cluster={
                    "connections": 1,
                    "balance": "round_robin",
                    "resolver": f"127.0.0.1:{dns_server.port}",
                    "resolve_interval": "50ms",
                    "resolve_hold": "1h",
                },
            ) as h,
        ):
            pool = h.pool()

            def backends() -> list[str]:
                return [str(x.address) for x in pool.backends]

            assert backends() == [f"127.0.0.2:{port}"]  # resolved before serving
            stop = anyio.Event()

            async def load() -> None:
                client = await h.client()
                try:
                    while not stop.is_set():
                        statuses.append((await client.request("GET", "/hello")).status)
                finally:
                    await client.aclose()

            async def slow() -> None:
                statuses.append((await h.get("/block")).status)

            async with anyio.create_task_group() as load_tg:
                for _ in range(3):
                    load_tg.start_soon(load)
                load_tg.start_soon(slow)
                await wait_for(lambda: len(a_script.started) == 1 and a_script.served > 10)

                dns_server.publish("127.0.0.2", "127.0.0.3")  # a backend appears
                await wait_for(lambda: b_script.served > 10)
                assert len(backends()) == 2

                dns_server.publish("127.0.0.3")  # one vanishes while /block is in flight on it
                await wait_for(lambda: backends() == [f"127.0.0.3:{port}"])
                await wait_for(lambda: not a_script.release.is_set() and len(a.connections) == 1)
                served_a = a_script.served
                served_b = b_script.served
                await wait_for(lambda: b_script.served > served_b + 60)
                # Drained: no new streams. The 3 load clients may each have had one request
                # in flight on it when the removal was seen; those finish there.
                assert a_script.served <= served_a + 3
                a_script.release.set()  # the in-flight request finishes on the old connection
                await wait_for(lambda: len(a.connections) == 0)  # then it closes

                dns_server.publish()  # NXDOMAIN: held (resolve_hold), requests keep flowing
                assert pool.discovery is not None
                held = pool.discovery.sets[pool.discovery.names[0]]
                await wait_for(lambda: held.holding)
                served_b = b_script.served
                await wait_for(lambda: b_script.served > served_b + 20)
                assert backends() == [f"127.0.0.3:{port}"]
                stop.set()
        tg.cancel_scope.cancel()
    assert statuses.count(200) == len(statuses) > 60, sorted(set(statuses))


async def test_dns_failure_keeps_the_last_good_set(tmp_path: Path) -> None:
    script = Script()
    origin = H2Origin(script)
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve, "127.0.0.2")
        async with (
            dnsmasq(tmp_path, "127.0.0.2") as dns_server,
            running(
                Script(),
                backends=[f"{NAME}:{port}"],
                cluster={
                    "connections": 1,
                    "resolver": f"127.0.0.1:{dns_server.port}",
                    "resolve_interval": "100ms",
                },
            ) as h,
        ):
            assert (await h.get("/hello")).status == 200
            dns_server.process.terminate()  # no DNS server any more: lookups time out
            await dns_server.process.wait()
            pool = h.pool()
            assert pool.discovery is not None
            name_set = pool.discovery.sets[pool.discovery.names[0]]
            await wait_for(lambda: name_set.failures >= 1, limit=20)
            assert [str(x.address) for x in pool.backends] == [f"127.0.0.2:{port}"]
            assert (await h.get("/hello")).status == 200
        tg.cancel_scope.cancel()


async def test_a_name_that_never_resolves_answers_503_not_a_hang(tmp_path: Path) -> None:
    async with (
        dnsmasq(tmp_path) as dns_server,
        running(
            Script(),
            backends=[f"{NAME}:9"],
            cluster={"resolver": f"127.0.0.1:{dns_server.port}", "resolve_interval": "100ms"},
        ) as h,
    ):
        response = await h.get("/hello")
        assert response.status == 503


def test_resolver_must_be_an_ip_address() -> None:
    text = """
[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
[[clusters]]
name = "app"
backends = ["app.test:80"]
resolver = "dns.example:53"
[[routes]]
cluster = "app"
"""
    with pytest.raises(ConfigError, match=r"^clusters\[0\]\.resolver: "):
        loads(text)
    with pytest.raises(ConfigError, match=r"^clusters\[0\]\.resolve_interval: "):
        loads(text.replace('resolver = "dns.example:53"', "resolve_interval = 0"))


async def test_a_large_answer_is_read_whole(tmp_path: Path) -> None:
    # 120 A records (about 2 KB) do not fit a plain 512-byte UDP answer.
    ips = [f"127.0.1.{i}" for i in range(1, 121)]
    async with (
        dnsmasq(tmp_path, *ips) as dns_server,
        running(
            Script(),
            backends=[f"{NAME}:9"],
            cluster={"connections": 1, "resolver": f"127.0.0.1:{dns_server.port}"},
        ) as h,
    ):
        assert sorted(str(b.address.host) for b in h.pool().backends) == sorted(ips)
