"""HTTP/1.1 clients → muxproxy (subprocess; asyncio and trio) → real HTTP/3 servers.

Peers (interop/h3peers.py): Caddy 2.6 (Go; quic-go), which is neither ours nor Python, and
hypercorn with ``--quic-bind`` (aioquic underneath, like muxproxy, but its server side). The
certificate is made per run by a trustme CA and muxproxy verifies it (``tls.ca`` and
``tls.server_name``); a wrong name or an untrusted CA must end in 503, never in a response.

One peer and one muxproxy per (peer, loop) serve all the tests of that combination, so the
whole file stays well under a minute; every request that carries a body gets one of its own,
so a response delivered to the wrong client fails the exact-body check.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from .h1 import H1Client, Response
from .h3client import H3Request, h3_fetch
from .h3peers import CONNECTIONS, H3Peer, PeerName, Pki, run_h3_proxy, run_peer
from .proxy import Proxy

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=["caddy", "hypercorn"])
def peer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[H3Peer]:
    name: PeerName = request.param
    with run_peer(tmp_path_factory.mktemp(name), name, pki) as running:
        yield running


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def mux_loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def h3proxy(
    peer: H3Peer, mux_loop: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp(f"muxproxy-{peer.name}-{mux_loop}")
    with run_h3_proxy(workdir, peer, mux_loop) as running:
        yield running


# --------------------------------------------------------------------------- helpers


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

    def check(self, r: Response, peer: H3Peer) -> str | None:
        """A description of what is wrong with ``r``, or None."""
        if r.status != 200:
            return f"{self.method} {self.target} → {r.status} {r.body[:200]!r}"
        if r.body != self.expected:
            digest = hashlib.sha256(r.body).hexdigest()[:12]
            return (
                f"{self.method} {self.target} → {len(r.body)} bytes "
                f"(expected {len(self.expected)}), sha256 {digest}"
            )
        if r.header("x-proto") != peer.proto:
            return f"{self.method} {self.target}: {peer.name} saw {r.header('x-proto')!r}"
        if r.header("x-peer") is None:
            return f"{self.method} {self.target}: the peer's X-Peer header did not come through"
        return None


def mixed_call(peer: H3Peer, client: int, i: int, *, big_every: int = 0) -> Call:
    """GET /small, a unique echo (Content-Length or chunked), and now and then GET /big."""
    if big_every and i % big_every == big_every - 1:
        return Call("GET", "/big", peer.big)
    unique = f"client {client} request {i} ".encode() * (1 + (client + i) % 40)
    return [
        Call("GET", "/small", peer.small),
        Call("POST", "/echo", unique, body=unique),
        Call("POST", "/echo", unique, body=unique, chunked=True),
    ][i % 3]


# --------------------------------------------------------------------------- the peer alone


def test_peer_serves_h3_directly(peer: H3Peer) -> None:
    """Without muxproxy: aioquic's client, certificate verified against the test CA."""
    body = random.Random(7).randbytes(100 * 1024)
    small, big, echo = h3_fetch(
        peer.port,
        [H3Request("GET", "/small"), H3Request("GET", "/big"), H3Request("POST", "/echo", body)],
        ca_file=peer.pki.ca_file,
    )
    assert (small.status, small.body) == (200, peer.small)
    assert (big.status, big.body) == (200, peer.big)
    assert (echo.status, echo.body) == (200, body)
    assert small.header("x-proto") == peer.proto


# --------------------------------------------------------------------------- through muxproxy


def test_get_small(h3proxy: Proxy, peer: H3Peer) -> None:
    with h3proxy.client() as c:
        r = c.request("GET", "/small")
    assert Call("GET", "/small", peer.small).check(r, peer) is None


def test_get_big(h3proxy: Proxy, peer: H3Peer) -> None:
    with h3proxy.client() as c:
        r = c.request("GET", "/big")
    assert r.status == 200
    assert len(r.body) == len(peer.big)
    assert hashlib.sha256(r.body).hexdigest() == hashlib.sha256(peer.big).hexdigest()
    assert r.header("x-proto") == peer.proto


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "size", [0, 1024, 100 * 1024, 1024 * 1024], ids=["0B", "1KiB", "100KiB", "1MiB"]
)
def test_post_echo(h3proxy: Proxy, peer: H3Peer, size: int, chunked: bool) -> None:
    body = random.Random(size).randbytes(size)
    with h3proxy.client() as c:
        r = c.request("POST", "/echo", body=body, chunked=chunked)
    assert r.status == 200, r.body[:200]
    assert len(r.body) == size
    assert r.body == body
    assert r.header("x-proto") == peer.proto


def test_many_requests_on_one_keepalive_connection(h3proxy: Proxy, peer: H3Peer) -> None:
    calls = [mixed_call(peer, 0, i, big_every=50) for i in range(200)]
    quic_conns = set()
    with h3proxy.client() as c:
        for i, call in enumerate(calls):
            r = call.run(c)
            problem = call.check(r, peer)
            assert problem is None, f"request {i}: {problem}"
            quic_conns.add(r.header("x-peer"))
        assert c.connects == 1, "the proxy closed the client's keep-alive connection"
    assert 1 <= len(quic_conns) <= CONNECTIONS, quic_conns


def test_concurrent_clients_share_the_pool(h3proxy: Proxy, peer: H3Peer) -> None:
    """20 concurrent keep-alive clients × 20 requests over ``connections = 2`` QUIC
    connections: all 200 with exact bodies, carried by at most 2 QUIC connections."""
    clients, per_client = 20, 20

    def one_client(n: int) -> tuple[list[str], set[str], int]:
        failures: list[str] = []
        quic_conns: set[str] = set()
        with h3proxy.client() as c:
            for i in range(per_client):
                call = mixed_call(peer, n, i)
                try:
                    r = call.run(c)
                except Exception as exc:
                    failures.append(f"client {n} request {i}: {call.target}: {exc!r}")
                    break
                problem = call.check(r, peer)
                if problem:
                    failures.append(f"client {n} request {i}: {problem}")
                quic_conns.add(r.header("x-peer") or "?")
            return failures, quic_conns, c.connects

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one_client, range(clients)))
    failures = [f for fs, _, _ in results for f in fs]
    assert not failures, f"{len(failures)} failed:\n" + "\n".join(failures[:15])
    assert sum(connects for _, _, connects in results) == clients
    quic_conns = set().union(*(conns for _, conns, _ in results))
    assert 1 <= len(quic_conns) <= CONNECTIONS, quic_conns


@pytest.mark.parametrize("case", ["wrong-server-name", "untrusted-ca"])
def test_certificate_is_verified(peer: H3Peer, mux_loop: str, tmp_path: Path, case: str) -> None:
    """The same peer, but muxproxy expects another name, or trusts another CA: no QUIC
    connection completes, so the client gets 503 and the handshake failure is logged."""
    if case == "wrong-server-name":
        server_name, ca_file, reason = "other.test", peer.pki.ca_file, "doesn't match"
    else:
        ca_file = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(ca_file))
        server_name, reason = "localhost", "unable to get local issuer certificate"
    with run_h3_proxy(
        tmp_path / "muxproxy", peer, mux_loop, server_name=server_name, ca_file=ca_file
    ) as proxy:
        with proxy.client() as c:
            r = c.request("GET", "/small")
        assert r.status == 503, (r.status, r.body[:200])
        assert peer.small not in r.body
        assert reason in proxy.stderr.text(), proxy.stderr.text()[-2000:]
