"""HTTP/1.1 clients → muxproxy (subprocess, asyncio and trio) → nginx as a plain HTTP/1.1
backend (``protocol = "http1"``): keep-alive reuse, ``keepalive_requests`` closing connections
under load, chunked responses, a backend closing mid-response, and the connection budget.

nginx logs ``$connection $remote_port $status`` for every request, so the tests count the
backend connections the proxy really used where they arrive.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from .nginx import BIG_SIZE, Nginx
from .proxy import Proxy, run_proxy
from .test_nginx_backend import load, mixed_call

pytestmark = pytest.mark.parametrize("backend_protocol", ["http1"])


@pytest.fixture
def wide_proxy(tmp_path: Path, nginx: Nginx, loop: str) -> Iterator[Proxy]:
    with run_proxy(tmp_path / "muxproxy-wide", nginx, loop, connections=8) as running:
        yield running


def connections_seen(nginx: Nginx) -> set[int]:
    return {conn for conn, _, _ in nginx.access_log()}


def test_keepalive_connections_are_reused(proxy: Proxy, nginx: Nginx) -> None:
    with proxy.client() as c:
        for i in range(60):
            r = c.request("GET", "/small")
            assert r.status == 200 and r.body == nginx.small, i
    log = nginx.access_log()
    assert len(log) == 60
    # connections = 2: every request rode one of two keep-alive connections
    assert 1 <= len(connections_seen(nginx)) <= 2, log
    assert nginx.accepted_backend_connections() <= 2


@pytest.mark.parametrize("keepalive_requests", [10])
def test_keepalive_requests_closing_under_load_loses_nothing(proxy: Proxy, nginx: Nginx) -> None:
    """nginx closes every connection after 10 requests (``Connection: close`` on the 10th):
    600 requests from 20 concurrent clients over 2 connections all succeed."""
    result = load(proxy, 20, 30, lambda n, i: mixed_call(nginx, n, i, big_every=25))
    result.assert_no_failures()
    assert result.client_connects == 20, "the proxy closed client keep-alive connections"
    per_conn: dict[int, int] = {}
    for conn, _, _ in nginx.access_log():
        per_conn[conn] = per_conn.get(conn, 0) + 1
    assert max(per_conn.values()) <= 10, per_conn
    assert len(per_conn) >= 600 // 10, len(per_conn)  # connections really were replaced


def test_chunked_response(proxy: Proxy, nginx: Nginx) -> None:
    with proxy.client() as c:
        for _ in range(3):  # and the connection stays reusable after a chunked body
            r = c.request("GET", "/chunked")
            assert r.status == 200
            assert len(r.body) == BIG_SIZE
            assert hashlib.sha256(r.body).digest() == hashlib.sha256(nginx.big).digest()
    assert nginx.accepted_backend_connections() <= 2


def test_request_bodies_both_framings(proxy: Proxy) -> None:
    body = os.urandom(300 * 1024)
    with proxy.client() as c:
        for chunked in (False, True, False):
            r = c.request("POST", "/echo", body=body, chunked=chunked)
            assert r.status == 200 and r.body == body


def test_backend_closing_before_responding_is_502(proxy: Proxy, nginx: Nginx) -> None:
    with proxy.client() as c:
        r = c.request("GET", "/drop")
        assert r.status == 502
    with proxy.client() as c:  # the pool replaced the connection nginx dropped
        r = c.request("GET", "/small")
        assert r.status == 200 and r.body == nginx.small


def _worker_pids(nginx: Nginx) -> list[int]:
    master = nginx.process.pid
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                out.append(int(entry))
    return out


def test_backend_closing_mid_response(proxy: Proxy, nginx: Nginx) -> None:
    """nginx's worker dies while streaming a response: that client never sees a complete
    response (its connection closes short); the next request is answered by a replacement."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    try:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: app\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or len(got) < 64 * 1024:
            chunk = sock.recv(65536)
            assert chunk, got[:200]
            got += chunk
        head = got.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 200")
        for pid in _worker_pids(nginx):
            os.kill(pid, signal.SIGKILL)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        body = got.split(b"\r\n\r\n", 1)[1]
        assert len(body) < BIG_SIZE, "a truncated response was relayed as complete"
    finally:
        sock.close()
    with proxy.client() as c:
        r = c.request("GET", "/small")
        assert r.status == 200 and r.body == nginx.small


def test_500_clients_over_8_connections(wide_proxy: Proxy, nginx: Nginx) -> None:
    """The must-hold: 500 concurrent clients, ``connections = 8``: every request answered, and
    nginx sees at most 8 distinct connections from the proxy."""
    result = load(wide_proxy, 500, 2, lambda n, i: mixed_call(nginx, n, i))
    result.assert_no_failures()
    seen = connections_seen(nginx)
    assert len(nginx.access_log()) == 1000
    assert 1 <= len(seen) <= 8, sorted(seen)
    ports = {port for _, port, _ in nginx.access_log()}
    assert len(ports) <= 8, sorted(ports)
    assert nginx.accepted_backend_connections() <= 8
