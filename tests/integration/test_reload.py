"""Reload in place (Proxy.reload / SIGHUP): routes, clusters and listeners swap at once; an
unchanged cluster keeps its pool and streams; a changed one drains; a bad config changes
nothing, says why once and is counted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import anyio.streams.tls
import h11
import pytest

from muxproxy.config import loads
from muxproxy.demo.h1client import H1Client
from muxproxy.io.server import ReloadError

from .harness import config_text, running, wait_for
from .origin import Script
from .ws_origin import WSScript
from .wsclient import WSClient

pytestmark = pytest.mark.anyio


def two_clusters(
    port: int,
    *,
    extra_connections: int = 1,
    extra_host: str = "extra.test",
    listen2: str | None = None,
    tls: str = "",
) -> str:
    text = config_text(
        [f"127.0.0.1:{port}"],
        cluster={"connections": 1},
        routes=(
            f'[[routes]]\nhost = "{extra_host}"\ncluster = "extra"\n'
            '[[routes]]\nhost = "*"\ncluster = "app"\nwebsocket = true\n'
        ),
    )
    text += (
        f'[[clusters]]\nname = "extra"\nbackends = ["127.0.0.1:{port}"]\n'
        f"connections = {extra_connections}\n"
    )
    if listen2 is not None:
        text += f'[[listeners]]\nname = "second"\nlisten = "{listen2}"\n{tls}'
    return text


async def test_new_route_served_unchanged_pool_kept_changed_pool_drains() -> None:
    script = WSScript()
    async with running(script, cluster={"connections": 1}, origin={"connect_protocol": True}) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        await h.proxy.reload(loads(two_clusters(port)))
        assert h.proxy.generation == 2
        app_pool = h.proxy.pools["app"]
        c = await h.client()
        assert (await c.request("GET", "/hello", host="extra.test")).status == 200
        ws = await WSClient.connect(h.addr.host, h.addr.port)
        await ws.send("before")
        assert await ws.receive() == "before"
        # An in-flight request on "extra", whose settings change: its old pool drains.
        blocked = await h.client()
        result: list[int] = []
        async with anyio.create_task_group() as tg:

            async def in_flight() -> None:
                result.append((await blocked.request("GET", "/block", host="extra.test")).status)

            tg.start_soon(in_flight)
            await wait_for(lambda: bool(script.started))
            old_extra = h.proxy.pools["extra"]
            await h.proxy.reload(
                loads(two_clusters(port, extra_connections=2, extra_host="new.test"))
            )
            assert h.proxy.pools["app"] is app_pool  # unchanged: same pool, same streams
            assert h.proxy.pools["extra"] is not old_extra
            # The new route at once; extra.test now falls to the catch-all route.
            assert (await c.request("GET", "/hello", host="new.test")).status == 200
            assert h.proxy.router.match(b"extra.test", b"/hello").cluster == "app"  # type: ignore[union-attr]
            assert old_extra in h.proxy._pool_scopes  # still draining: a stream is open
            script.release.set()
        assert result == [200]
        await wait_for(lambda: old_extra not in h.proxy._pool_scopes)  # drained, closed
        await ws.send("after")
        assert await ws.receive() == "after"  # the WebSocket on the unchanged pool lives on
        await ws.close()
        await c.aclose()
        await blocked.aclose()


async def test_keep_alive_connection_uses_the_new_config_on_its_next_request() -> None:
    async with running(Script(), cluster={"connections": 1}) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        c = await h.client()
        assert (await c.request("GET", "/hello", host="nowhere.test")).status == 200
        routes = '[[routes]]\nhost = "only.test"\ncluster = "app"\n'
        await h.proxy.reload(loads(config_text([f"127.0.0.1:{port}"], routes=routes)))
        assert (await c.request("GET", "/hello", host="nowhere.test")).status == 404
        assert (await c.request("GET", "/hello", host="only.test")).status == 200
        await c.aclose()


async def test_bad_config_keeps_the_old_one_logs_one_line_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(Script()) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        path = tmp_path / "proxy.toml"
        path.write_text(
            config_text([f"127.0.0.1:{port}"]).replace('cluster = "app"', 'cluster = "nope"')
        )
        with caplog.at_level(logging.ERROR, "muxproxy"):
            assert not await h.proxy.reload_file(path)
        [rec] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "reload failed" in rec.getMessage() and "routes[0].cluster" in rec.getMessage()
        # A missing certificate file: caught before anything changes.
        caplog.clear()
        bad_tls = two_clusters(
            port,
            listen2="127.0.0.1:0",
            tls=f'[listeners.tls]\ncert = "{tmp_path}/no.pem"\nkey = "{tmp_path}/no.key"\n',
        )
        path.write_text(bad_tls)
        with caplog.at_level(logging.ERROR, "muxproxy"):
            assert not await h.proxy.reload_file(path)
        [rec] = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "listeners[1].tls" in rec.getMessage()
        assert h.proxy.reload_statistics() == {
            "config_generation": 1,
            "reloads": 0,
            "reloads_failed": 2,
        }
        assert set(h.proxy.pools) == {"app"}
        assert (await h.get("/hello")).status == 200


async def test_listener_added_then_removed() -> None:
    async with running(Script()) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        probe = await anyio.create_tcp_listener(local_host="127.0.0.1")
        free = probe.extra(anyio.abc.SocketAttribute.local_port)
        await probe.aclose()
        await h.proxy.reload(loads(two_clusters(port, listen2=f"127.0.0.1:{free}")))
        c = await H1Client.connect("127.0.0.1", free)
        assert (await c.request("GET", "/hello")).status == 200
        # A port already taken: the reload fails as a whole and nothing changes.
        taken = await anyio.create_tcp_listener(local_host="127.0.0.1")
        busy = taken.extra(anyio.abc.SocketAttribute.local_port)
        with pytest.raises(ReloadError, match=r"listeners\[1\]\.listen: cannot listen on"):
            await h.proxy.reload(loads(two_clusters(port, listen2=f"127.0.0.1:{busy}")))
        await taken.aclose()
        assert h.proxy.generation == 2
        await h.proxy.reload(loads(two_clusters(port)))
        # The removed listener's idle keep-alive connection is closed (on uvloop the request
        # is still written, and the client's h11 then sees the close instead of a response)...
        with pytest.raises(
            (anyio.EndOfStream, anyio.BrokenResourceError, OSError, h11.RemoteProtocolError)
        ):
            await c.request("GET", "/hello")
        await c.aclose()
        # ...and it accepts no more.
        with pytest.raises(OSError):
            await H1Client.connect("127.0.0.1", free)
        assert (await h.get("/hello")).status == 200


async def _healthz(host: str, port: int) -> int:
    c = await H1Client.connect(host, port)
    try:
        return (await c.request("GET", "/healthz")).status
    finally:
        await c.aclose()


async def test_admin_added_moved_and_removed_in_place() -> None:
    """A single process applies an [admin] change itself: the new address is bound before the
    swap (a taken one fails the reload as a whole), the old one stops answering."""
    async with running(Script()) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        base = two_clusters(port)
        assert h.proxy.admin_address is None
        await h.proxy.reload(loads(base + '[admin]\nlisten = "127.0.0.1:0"\n'))
        first = h.proxy.admin_address
        assert first is not None and await _healthz(first.host, first.port) == 200
        await h.proxy.reload(loads(base + '[admin]\nlisten = "127.0.0.2:0"\n'))
        moved = h.proxy.admin_address
        assert moved is not None and moved.host == "127.0.0.2"
        assert await _healthz(moved.host, moved.port) == 200
        with pytest.raises(OSError):
            await H1Client.connect(first.host, first.port)
        taken = await anyio.create_tcp_listener(local_host="127.0.0.3")
        busy = taken.extra(anyio.abc.SocketAttribute.local_port)
        with pytest.raises(ReloadError, match=r"admin\.listen: cannot listen on"):
            await h.proxy.reload(loads(base + f'[admin]\nlisten = "127.0.0.3:{busy}"\n'))
        await taken.aclose()
        assert h.proxy.admin_address == moved and await _healthz(moved.host, moved.port) == 200
        await h.proxy.reload(loads(base))
        assert h.proxy.admin_address is None
        with pytest.raises(OSError):
            await H1Client.connect(moved.host, moved.port)
        assert (await h.get("/hello")).status == 200


async def test_reload_rereads_listener_certificates(tmp_path: Path) -> None:
    """Replaced certificate files: after a reload, new handshakes get the new certificate on
    the same (kept) listening socket."""
    import ssl

    import trustme

    authority = trustme.CA()
    cert, key = tmp_path / "edge.pem", tmp_path / "edge.key"

    def issue(name: str) -> bytes:
        leaf = authority.issue_cert(name)
        leaf.private_key_pem.write_to_path(str(key))
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    client_ctx = ssl.create_default_context()
    authority.configure_trust(client_ctx)
    client_ctx.check_hostname = False

    async def served_cert(addr: Any) -> bytes:
        stream = await anyio.connect_tcp(addr.host, addr.port, tls=True, ssl_context=client_ctx)
        der = stream.extra(anyio.streams.tls.TLSAttribute.peer_certificate_binary)
        await anyio.aclose_forcefully(stream)
        assert der is not None
        return bytes(der)

    first = issue("one.test")
    async with running(Script()) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        tls = f'[listeners.tls]\ncert = "{cert}"\nkey = "{key}"\n'
        text = two_clusters(port, listen2="127.0.0.1:0", tls=tls)
        await h.proxy.reload(loads(text))
        [tls_entry] = [e for e in h.proxy._listening.values() if e.lc.name == "second"]
        assert await served_cert(tls_entry.address) == first
        second = issue("two.test")
        await h.proxy.reload(loads(text))
        assert [e for e in h.proxy._listening.values() if e.lc.name == "second"] == [tls_entry]
        assert await served_cert(tls_entry.address) == second


async def test_tls_client_gone_right_after_its_handshake_costs_one_connection(
    tmp_path: Path,
) -> None:
    """Found while testing certificate reloads: the peer address lookup of a TLS stream whose
    client already left raised TypedAttributeLookupError, which took the whole proxy down."""
    import ssl

    import trustme

    authority = trustme.CA()
    leaf = authority.issue_cert("edge.test")
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    ctx = ssl.create_default_context()
    authority.configure_trust(ctx)
    ctx.check_hostname = False
    async with running(Script()) as h:
        port = h.proxy.config.clusters[0].backends[0].port
        tls = f'[listeners.tls]\ncert = "{tmp_path}/c.pem"\nkey = "{tmp_path}/k.pem"\n'
        await h.proxy.reload(loads(two_clusters(port, listen2="127.0.0.1:0", tls=tls)))
        [entry] = [e for e in h.proxy._listening.values() if e.lc.name == "second"]
        for _ in range(20):
            s = await anyio.connect_tcp(
                entry.address.host, entry.address.port, tls=True, ssl_context=ctx
            )
            await anyio.aclose_forcefully(s)
        await wait_for(lambda: not entry.open_here)
        assert (await h.get("/hello")).status == 200


def test_reload_command_checks_before_signalling(tmp_path: Path) -> None:
    """`muxproxy reload`: a bad file, a missing certificate or no pid_file is one line and
    exit 1, and nobody is signalled; a good file signals the pid in pid_file."""
    import os
    import signal
    import subprocess
    import sys

    def reload(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "proxy.toml"
        path.write_text(text)
        argv = [sys.executable, "-m", "muxproxy", "reload", "-c", str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    pid_file = tmp_path / "pid"
    good = f'[proxy]\npid_file = "{pid_file}"\n' + config_text(["127.0.0.1:1"])
    r = reload(config_text(["127.0.0.1:1"]))
    assert r.returncode == 1 and "proxy.pid_file: not set" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    tls = f'tls = {{ cert = "{tmp_path}/no.pem", key = "{tmp_path}/no.key" }}\n'
    r = reload(good.replace('listen = "127.0.0.1:0"\n', 'listen = "127.0.0.1:0"\n' + tls))
    assert r.returncode == 1 and "listeners[0].tls" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    received: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: received.append(signum))
    try:
        pid_file.write_text(f"{os.getpid()}\n")
        r = reload(good)
        assert r.returncode == 0, r.stderr
        assert received == [signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, previous)
