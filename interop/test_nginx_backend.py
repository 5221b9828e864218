"""HTTP/1.1 clients → muxproxy (subprocess, asyncio and trio) → nginx (h2c and TLS h2).

Every request that carries a body gets a body of its own, so a response delivered to the wrong
client (streams mixed up on a shared backend connection) fails the exact-body check.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from .h1 import H1Client, Response
from .nginx import BIG_SIZE, HEADERS_FIELDS, Nginx
from .proxy import CONNECTIONS, Proxy


@dataclass(frozen=True)
class Call:
    """One request and the exact body its response must have."""

    method: str
    target: str
    expected: bytes
    body: bytes | None = None
    chunked: bool = False

    def run(self, client: H1Client) -> Response:
        return client.request(self.method, self.target, body=self.body, chunked=self.chunked)

    def check(self, r: Response) -> str | None:
        """A description of what is wrong with ``r``, or None."""
        if r.status != 200:
            return f"{self.method} {self.target} → {r.status} {r.body[:200]!r}"
        if r.body != self.expected:
            return (
                f"{self.method} {self.target} → {len(r.body)} bytes "
                f"(expected {len(self.expected)}), sha256 {hashlib.sha256(r.body).hexdigest()[:12]}"
            )
        if r.header("x-conn") is None:
            return f"{self.method} {self.target}: nginx's X-Conn header did not come through"
        return None


def echo(body: bytes, *, chunked: bool = False) -> Call:
    return Call("POST", "/echo", body, body=body, chunked=chunked)


def mixed_call(nginx: Nginx, client: int, i: int, *, big_every: int = 0) -> Call:
    """GET /small, a unique echo (Content-Length or chunked), and now and then GET /big."""
    if big_every and i % big_every == big_every - 1:
        return Call("GET", "/big", nginx.big)
    unique = f"client {client} request {i} ".encode() * (1 + (client + i) % 40)
    return [Call("GET", "/small", nginx.small), echo(unique), echo(unique, chunked=True)][i % 3]


@dataclass
class LoadResult:
    requests: int
    failures: list[str]
    conns: Counter[str]  # X-Conn (nginx's TCP connection serial) → responses it carried
    client_connects: int

    def assert_no_failures(self) -> None:
        shown = "\n".join(self.failures[:15])
        assert not self.failures, f"{len(self.failures)}/{self.requests} requests failed:\n{shown}"


def load(
    proxy: Proxy, clients: int, per_client: int, make: Callable[[int, int], Call]
) -> LoadResult:
    """``clients`` concurrent keep-alive connections, each sending ``per_client`` requests in
    sequence. A failed request is recorded, never retried; a broken connection ends its client
    (its remaining requests count as failed)."""

    def one_client(n: int) -> tuple[list[str], list[str], int]:
        failures: list[str] = []
        conns: list[str] = []
        with proxy.client() as client:
            for i in range(per_client):
                call = make(n, i)
                try:
                    r = call.run(client)
                except Exception as exc:
                    failures.append(f"client {n} request {i}: {call.method} {call.target}: {exc!r}")
                    unsent = range(i + 1, per_client)
                    failures += [f"client {n} request {j}: not sent" for j in unsent]
                    break
                problem = call.check(r)
                if problem:
                    failures.append(f"client {n} request {i}: {problem}")
                conns.append(r.header("x-conn") or "?")
            return failures, conns, client.connects

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one_client, range(clients)))
    return LoadResult(
        requests=clients * per_client,
        failures=[f for failures, _, _ in results for f in failures],
        conns=Counter(c for _, conns, _ in results for c in conns),
        client_connects=sum(connects for _, _, connects in results),
    )


def test_get_small(proxy: Proxy, nginx: Nginx) -> None:
    with proxy.client() as c:
        r = c.request("GET", "/small")
    assert r.status == 200
    assert r.body == nginx.small


def test_get_big(proxy: Proxy, nginx: Nginx) -> None:
    with proxy.client() as c:
        r = c.request("GET", "/big")
    assert r.status == 200
    assert len(r.body) == BIG_SIZE
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(nginx.big).hexdigest()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("size", [0, 1024, 100 * 1024], ids=["0B", "1KiB", "100KiB"])
def test_post_echo(proxy: Proxy, size: int, chunked: bool) -> None:
    body = random.Random(size).randbytes(size)
    with proxy.client() as c:
        r = c.request("POST", "/echo", body=body, chunked=chunked)
    assert r.status == 200
    assert len(r.body) == size
    assert r.body == body


def test_many_requests_on_one_keepalive_connection(proxy: Proxy, nginx: Nginx) -> None:
    calls = [mixed_call(nginx, 0, i, big_every=50) for i in range(200)]
    conns = set()
    with proxy.client() as c:
        for i, call in enumerate(calls):
            r = call.run(c)
            assert call.check(r) is None, f"request {i}: {call.check(r)}"
            conns.add(r.header("x-conn"))
        assert c.connects == 1, "the proxy closed the client's keep-alive connection"
    assert len(conns) <= CONNECTIONS


def test_concurrent_clients_share_the_pool(proxy: Proxy, nginx: Nginx) -> None:
    """50 concurrent client connections × 20 requests, over ``connections = 2`` to nginx."""
    result = load(proxy, 50, 20, lambda n, i: mixed_call(nginx, n, i))
    result.assert_no_failures()
    assert result.client_connects == 50, "the proxy closed client keep-alive connections"
    # 1,000 requests in all, keepalive_requests = 1000: nginx retires no connection that still
    # has requests to carry, so the pool's 2 connections carried everything
    assert 1 <= len(result.conns) <= CONNECTIONS, result.conns
    assert 1 <= nginx.accepted_backend_connections() <= CONNECTIONS


def test_forwarding_headers(proxy: Proxy) -> None:
    def headers_seen(c: H1Client, extra: list[tuple[str, str]]) -> dict[str, str]:
        r = c.request("GET", "/headers", host="app.example:8080", headers=extra)
        assert r.status == 200, r.body
        return dict(zip(HEADERS_FIELDS, r.body.decode().split("|"), strict=True))

    with proxy.client() as c:
        plain = headers_seen(c, [])
        spoofed = headers_seen(c, [("x-forwarded-for", "6.6.6.6")])
    assert plain["x-forwarded-for"] == "127.0.0.1"
    assert plain["x-forwarded-proto"] == "http"
    assert plain["x-forwarded-host"] == "app.example:8080"
    assert "muxproxy" in plain["via"]
    assert plain["host"] == "app.example"  # nginx's $host drops the port
    assert plain["http_host"] == "app.example:8080"
    assert plain["server_protocol"] == "HTTP/2.0"
    # a client that is not a trusted proxy cannot choose the address nginx sees
    assert spoofed["x-forwarded-for"] == "127.0.0.1"


@pytest.mark.parametrize("keepalive_requests", [100])
def test_nginx_goaway_after_keepalive_requests(proxy: Proxy, nginx: Nginx) -> None:
    """nginx ends each h2 connection with GOAWAY after 100 requests; 1,200 requests from 20
    concurrent clients through ``connections = 2`` must all succeed anyway."""
    clients, per_client = 20, 60
    result = load(proxy, clients, per_client, lambda n, i: mixed_call(nginx, n, i, big_every=30))
    result.assert_no_failures()
    assert result.client_connects == clients, "the proxy closed client keep-alive connections"
    # nginx really did retire connections: none carried more than 100 responses, so the
    # 1,200 responses came over at least 12 distinct backend connections
    assert max(result.conns.values()) <= nginx.keepalive_requests, result.conns
    assert len(result.conns) >= result.requests // nginx.keepalive_requests, result.conns


@pytest.mark.parametrize("backend_protocol", ["h2c"])
@pytest.mark.parametrize("keepalive_requests", [100])
def test_nginx_goaway_10000_requests_zero_failures(
    proxy: Proxy, nginx: Nginx, record_property: Callable[[str, object], None]
) -> None:
    """10,000 requests from 40 concurrent clients through a pool of 2, while nginx retires
    every connection after 100 requests: no request fails, and every retired connection was
    replaced (about 100 backend connections over the run; the count is reported)."""
    clients, per_client = 40, 250
    result = load(proxy, clients, per_client, lambda n, i: mixed_call(nginx, n, i))
    result.assert_no_failures()
    assert result.requests == 10_000
    assert max(result.conns.values()) <= nginx.keepalive_requests
    assert len(result.conns) >= result.requests // nginx.keepalive_requests
    record_property("backend_connections_opened", len(result.conns))
    print(f"\n10,000 requests over {len(result.conns)} backend connections (GOAWAY every 100)")
