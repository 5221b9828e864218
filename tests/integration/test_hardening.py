"""Edge hardening over real loopback sockets: the malformed-request corpus, the
Transfer-Encoding mutation matrix, header hygiene, slow clients and the connection cap.

Every refusal is checked three ways: the status, the close (``raw`` reads until the proxy
closes), and the origin: nothing reached it, or, for a body that turns bad after its head was
forwarded, the stream was reset before the request was complete.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import h2.errors
import pytest

from muxproxy.config import loads
from muxproxy.core.frontend_h11 import ClientSession, RequestHead
from muxproxy.demo.h2server import H2Origin, OriginRequest
from muxproxy.errors import ClientError
from muxproxy.io.server import Proxy
from tests.corpus import Case, load, reference
from tests.corpus.te_matrix import BODY, matrix

from .harness import Harness, config_text, running, wait_for
from .origin import Script

pytestmark = pytest.mark.anyio

CORPUS = load()


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def head_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0].lower()


class Recorder:
    """An origin that records every request, reads its body, and echoes its length."""

    def __init__(self) -> None:
        self.requests: list[OriginRequest] = []
        self.bodies: list[bytes] = []  # what each request's body was, once it ended or reset

    async def __call__(self, req: OriginRequest) -> None:
        self.requests.append(req)
        body = await req.read_body()
        self.bodies.append(body)
        if req.reset_by_peer is None:
            await req.respond(200, [(b"x-echo-length", str(len(body)).encode())], body)

    def none_complete(self) -> bool:
        return all(r.reset_by_peer is not None and not r.body_complete for r in self.requests)


def refused_at_head(case: Case) -> bool:
    """True when the head alone is refused; False when only its body is bad."""
    s = ClientSession()
    s.receive_data(case.raw if case.head_end < 0 else case.raw[: case.head_end])
    try:
        return not isinstance(s.next_event(), RequestHead)
    except ClientError:
        return True


BODY_CASES = [c for c in CORPUS if not refused_at_head(c)]


def test_corpus_is_big_and_every_rule_has_its_status() -> None:
    assert len(CORPUS) >= 60
    assert {c.status for c in CORPUS} == {400, 413, 414, 431, 501, 505}
    assert 15 <= len(BODY_CASES) < len(CORPUS)


# --- the corpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
async def test_corpus_request_is_refused_and_never_forwarded(case: Case) -> None:
    """Sent in one write.  A bad head never reaches the origin.  A bad body that arrives with
    its head is refused before the head is forwarded when both come in one read; should the
    head come alone, the origin sees it reset, never complete."""
    rec = Recorder()
    async with running(rec) as h:
        out = await h.raw(case.raw)
        assert status_of(out) == case.status, out[:300]
        assert b"\r\nconnection: close\r\n" in head_of(out) + b"\r\n"
        if case in BODY_CASES:
            await wait_for(rec.none_complete)
        else:
            assert h.origin.requests_received == 0


@pytest.mark.parametrize("case", BODY_CASES, ids=lambda c: c.name)
async def test_corpus_body_goes_bad_after_the_head_was_forwarded(case: Case) -> None:
    """The head first; once the origin has it, the bad body: the client gets the error, the
    origin a reset stream that never completed, and nothing after the bad bytes."""
    rec = Recorder()
    async with running(rec) as h:
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        out = bytearray()
        with anyio.fail_after(10):
            await stream.send(case.raw[: case.head_end])
            await wait_for(lambda: len(rec.requests) == 1)
            await stream.send(case.raw[case.head_end :])
            while True:
                try:
                    out += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        await stream.aclose()
        assert status_of(bytes(out)) == case.status
        assert b"connection: close" in head_of(bytes(out))
        await wait_for(lambda: len(rec.bodies) == 1)
        assert rec.none_complete()
        assert h.origin.requests_received == 1
        assert rec.requests[0].reset_by_peer == h2.errors.ErrorCodes.CANCEL
        # Only body bytes from before the bad ones, if any, reached the origin.
        assert reference.parse(case.raw).requests[0].body.startswith(rec.bodies[0])


# --- the Transfer-Encoding mutation matrix -------------------------------------------------------


async def test_te_mutation_matrix_through_the_proxy() -> None:
    """The smuggling scanners' default matrix, both placements: each request is refused with
    nothing forwarded, or forwarded once with the body its Content-Length frames, and a strict
    RFC 9112 reading of the same bytes agrees (so no parser could frame it otherwise)."""
    rec = Recorder()
    forwarded = []
    async with running(rec) as h:
        for name, raw in matrix(exhaustive=False):
            before = h.origin.requests_received
            out = await h.raw(raw)
            status = status_of(out)
            if status == 200:
                forwarded.append(name)
                assert h.origin.requests_received == before + 1, name
                assert rec.requests[-1].body_complete
                assert b"x-echo-length: 6" in head_of(out), name
                ref = reference.parse(raw)
                assert [(r.complete, r.body) for r in ref.requests] == [(True, BODY)], name
                names = [n for n, _ in ref.requests[0].headers]
                assert b"transfer-encoding" not in names, name
            else:
                assert status in (400, 501), (name, out[:200])
                assert b"connection: close" in head_of(out)
                assert h.origin.requests_received == before, name
    assert sorted(forwarded) == sorted(
        f"{g}-{w}"
        for g in ("contentEnc", "xprespace-09", "xprespace-20", "xprespace-a0", "xprespace-ff")
        for w in ("first", "last")
    )


# --- header hygiene ------------------------------------------------------------------------------


async def origin_headers(h: Harness, extra: bytes) -> tuple[bytes, list[list[str]]]:
    """The response head, and the header fields the origin received (from ``/headers``)."""
    out = await h.raw(
        b"GET /headers HTTP/1.1\r\nHost: app.test\r\n" + extra + b"Connection: close\r\n\r\n"
    )
    head, _, body = out.partition(b"\r\n\r\n")
    return head, json.loads(body)


async def test_h2c_upgrade_is_never_honoured_nor_forwarded() -> None:
    async with running(Script()) as h:
        head, seen = await origin_headers(
            h,
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        )
        assert head.startswith(b"HTTP/1.1 200 ")
        names = {k for k, _ in seen}
        assert not names & {"upgrade", "http2-settings", "connection"}


async def test_connection_cannot_delete_the_forwarding_fields_the_proxy_adds() -> None:
    async with running(Script()) as h:
        _, seen = await origin_headers(
            h,
            b"Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Via\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.test\r\n"
            b"Forwarded: for=6.6.6.6\r\nX-Drop: 1\r\n",
        )
        d = dict(map(tuple, seen))
        assert d["x-forwarded-for"] == "127.0.0.1"
        assert d["x-forwarded-proto"] == "http"
        assert d["x-forwarded-host"] == "app.test"
        assert "muxproxy" in d["via"]
        assert "forwarded" not in d and "6.6.6.6" not in json.dumps(seen)


@asynccontextmanager
async def running_trusting(networks: list[str]) -> AsyncIterator[Harness]:
    """Like ``harness.running`` with ``trusted_proxies`` on the listener."""
    origin = H2Origin(Script())
    async with anyio.create_task_group() as tg:
        port = await tg.start(origin.serve)
        text = config_text([f"127.0.0.1:{port}"]).replace(
            'listen = "127.0.0.1:0"\n',
            f'listen = "127.0.0.1:0"\ntrusted_proxies = {json.dumps(networks)}\n',
        )
        proxy = Proxy(loads(text))
        bound = await tg.start(proxy.serve)
        try:
            yield Harness(origin, proxy, bound["edge"])
        finally:
            tg.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("networks", "xff", "host"),
    [
        (["10.0.0.0/8"], "127.0.0.1", "app.test"),  # we are not in the list: replaced
        (["127.0.0.1/32"], "6.6.6.6, 127.0.0.1", "orig.test"),  # trusted: kept and extended
    ],
)
async def test_forwarding_fields_are_replaced_unless_the_peer_is_trusted(
    networks: list[str], xff: str, host: str
) -> None:
    async with running_trusting(networks) as h:
        _, seen = await origin_headers(
            h, b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: orig.test\r\n"
        )
        d = dict(map(tuple, seen))
        assert (d["x-forwarded-for"], d["x-forwarded-host"]) == (xff, host)


@pytest.mark.parametrize(
    ("policy", "field", "status", "forwarded_as"),
    [
        ("reject", b"X_Custom: 1", 400, None),
        ("drop", b"X_Custom: 1", 200, None),
        ("allow", b"X_Custom: 1", 200, "x_custom"),
        ("allow", b"X_Forwarded_For: 6.6.6.6", 400, None),  # never an alias of ours
        ("drop", b"Content_Length: 5", 200, None),
    ],
)
async def test_underscore_header_policies(
    policy: str, field: bytes, status: int, forwarded_as: str | None
) -> None:
    async with running(Script(), listener={"underscore_headers": policy}) as h:
        out = await h.raw(
            b"GET /headers HTTP/1.1\r\nHost: a.test\r\n" + field + b"\r\nConnection: close\r\n\r\n"
        )
        assert status_of(out) == status
        if status != 200:
            assert h.origin.requests_received == 0
            return
        seen = json.loads(out.partition(b"\r\n\r\n")[2])
        names = {k for k, _ in seen}
        assert not any("_" in n for n in names) if forwarded_as is None else forwarded_as in names


# --- slow clients --------------------------------------------------------------------------------


async def test_slowloris_trickling_a_head_gets_408() -> None:
    """One byte at a time, forever (header lines that never end the head): the whole-head
    deadline runs from the first byte and trickling does not extend it.  The client stops
    when the proxy closes; fail_after bounds it should the proxy never do so."""
    async with running(Script(), listener={"header_timeout": "300ms"}) as h:
        stream = await anyio.connect_tcp(h.addr.host, h.addr.port)
        out = bytearray()
        sent = 0
        head = b"GET / HTTP/1.1\r\nHost: a.test\r\n"
        filler = b"X-Slow: x\r\n"

        async def trickle() -> None:
            nonlocal sent
            data = head
            while True:
                if sent == len(data):
                    data += filler
                try:
                    await stream.send(data[sent : sent + 1])
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                sent += 1
                await anyio.sleep(0.01)  # the pace of the attack, not a synchronisation

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(trickle)
                while True:
                    try:
                        out += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
                tg.cancel_scope.cancel()
        await stream.aclose()
        assert status_of(bytes(out)) == 408
        assert h.origin.requests_received == 0


async def test_empty_lines_cannot_keep_an_idle_connection() -> None:
    async with running(Script()) as h:
        out = await h.raw(b"\r\n\r\n\r\n")
        assert status_of(out) == 400


async def test_stalled_request_body_gets_408_and_the_stream_is_reset() -> None:
    rec = Recorder()
    async with running(rec, listener={"body_timeout": "300ms"}) as h:
        out = await h.raw(b"POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\nabc")
        assert status_of(out) == 408
        await wait_for(rec.none_complete)
        assert len(rec.requests) == 1


async def test_slow_reader_is_dropped_after_send_timeout_holding_one_window() -> None:
    """A client that never reads a 32 MiB response: the proxy never holds more than the
    stream window for it, its neighbours on the same backend connection are served, and
    after send_timeout it is dropped and its stream reset."""
    script = Script()
    window = 65535
    size = 32 * 1024 * 1024
    async with running(
        script,
        listener={"send_timeout": "500ms"},
        cluster={"connections": 1, "stream_window": f"{window}B"},
    ) as h:
        slow = await anyio.connect_tcp(h.addr.host, h.addr.port)
        await slow.send(f"GET /big?{size} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
        await wait_for(lambda: len(script.started) == 1)
        conn = h.pool().backends[0].conns[0]
        for _ in range(5):  # the same backend connection serves others meanwhile
            assert (await h.get("/hello")).status == 200
        with anyio.fail_after(20):
            while h.origin.resets_received == 0:
                held = sum(len(d) for st in conn.core.streams.values() for d, _ in st.chunks)
                assert held <= window
                await anyio.sleep(0.005)  # polling a condition, bounded by fail_after
        await wait_for(lambda: not h.proxy.clients)
        received = 0
        with anyio.fail_after(20):  # what the kernel buffered, then the close
            while True:
                try:
                    received += len(await slow.receive(1 << 20))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        await slow.aclose()
        assert received < size
        assert (await h.get("/hello")).status == 200


async def test_connection_cap_refuses_new_connections_and_spares_existing_ones() -> None:
    async with running(Script(), listener={"max_connections": 3}) as h:
        clients = [await h.client() for _ in range(3)]
        for c in clients:  # each is served, so each is counted
            assert (await c.request("GET", "/hello")).status == 200
        extra = await anyio.connect_tcp(h.addr.host, h.addr.port)
        with anyio.fail_after(5):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await extra.receive()  # closed at once: no byte, no request read
        await extra.aclose()
        assert h.proxy.refused_connections == 1
        for c in clients:
            assert (await c.request("GET", "/hello")).status == 200
        await clients.pop().aclose()
        await wait_for(lambda: len(h.proxy.clients) == 2)
        again = await h.client()
        assert (await again.request("GET", "/hello")).status == 200
        for c in [*clients, again]:
            await c.aclose()
        assert h.origin.requests_received == 3 * 2 + 1


# --- what a backend sends ------------------------------------------------------------------------


def raw_response(headers: list[tuple[bytes, bytes]], trailers: bool = False):  # type: ignore[no-untyped-def]
    """An origin handler sending ``headers`` as they are: h2's own checks switched off, as a
    broken or hostile backend would."""

    async def handler(req: OriginRequest) -> None:
        await req.read_body()
        cfg = req.conn.h2.config
        cfg.validate_outbound_headers = False
        cfg.normalize_outbound_headers = False
        if trailers:
            await req.conn.send_headers(req.stream_id, [(b":status", b"200")], end_stream=False)
            await req.send_data(b"body")
            await req.conn.send_headers(req.stream_id, headers, end_stream=True)
        else:
            await req.conn.send_headers(req.stream_id, headers, end_stream=True)

    return handler


@pytest.mark.parametrize(
    "headers",
    [
        [(b":status", b"1000")],
        [(b":status", b"20")],
        [(b":status", b"2x0")],
        [(b":status", b"099")],
        [(b":status", b"600")],
        [(b":status", b"101")],
        [(b":status", b"200"), (b"x-a", b"a\r\nset-cookie: injected=1")],
        [(b":status", b"200"), (b"x-a", b"a\nset-cookie: injected=1")],
        [(b":status", b"200"), (b"x-a", b"a\x00b")],
        [(b":status", b"200"), (b"x-a", b"a\x01b")],
        [(b":status", b"200"), (b"x-a", b"a\x7fb")],
        [(b":status", b"200"), (b"x a", b"b")],
        [(b":status", b"200"), (b"x-a\r\nset-cookie", b"injected=1")],
    ],
    ids=lambda hs: repr(hs[-1])[:40],
)
async def test_backend_response_that_could_inject_is_502(
    headers: list[tuple[bytes, bytes]],
) -> None:
    async with running(raw_response(headers)) as h:
        out = await h.raw(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 502
        assert b"\nset-cookie" not in out.lower()  # (the 502's text may quote it, escaped)
        assert h.origin.requests_received == 1


async def test_backend_trailers_with_control_characters_are_dropped() -> None:
    bad = [(b"x-a", b"a\x01b"), (b"x-ok", b"1"), (b"content-length", b"9"), (b"x-b", b"\x7f")]
    async with running(raw_response(bad, trailers=True)) as h:
        out = await h.raw(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 200
        assert out.endswith(b"\r\n4\r\nbody\r\n0\r\nx-ok: 1\r\n\r\n")


async def test_backend_trailers_that_could_inject_cut_the_response() -> None:
    """CR/LF in a field value makes the message malformed (RFC 9113 §8.2.1), so the stream
    fails mid-body:
    the chunked response is cut before its last chunk (the client sees it truncated), and no
    injected line ever appears."""
    bad = [(b"x-a", b"a\r\nset-cookie: injected=1")]
    async with running(raw_response(bad, trailers=True)) as h:
        out = await h.raw(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 200
        assert out.endswith(b"\r\n4\r\nbody\r\n")
        assert b"set-cookie" not in out


# --- listener options ----------------------------------------------------------------------------


def test_underscore_headers_option_is_validated_with_its_key_path() -> None:
    from muxproxy.errors import ConfigError

    text = config_text(["127.0.0.1:1"], {"underscore_headers": "maybe"})
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert str(info.value).startswith("listeners[0].limits.underscore_headers: ")
    assert "\n" not in str(info.value)
    assert loads(config_text(["127.0.0.1:1"])).listeners[0].limits.underscore_headers == "reject"
