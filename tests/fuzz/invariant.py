"""The smuggling invariant, shared by the hypothesis properties and the atheris target.

For any bytes a client sends, muxproxy's HTTP/1.1 session either refuses them (ClientError),
or every request it forwards is one that a strict, independent RFC 9112 parser
(:mod:`tests.corpus.reference`) reads from the same bytes, in the same order, with the same
method, target, authority, header fields and body; and each forwarded head, re-serialised by a
real h11 client, parses back to the same request.  Refusing is always allowed; forwarding
something the reference reads differently, or not at all, is a smuggling bug.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11

from muxproxy.core.frontend_h11 import (
    CLOSED,
    NEED_DATA,
    Body,
    ClientSession,
    EndOfRequest,
    HeadLimits,
    RequestHead,
)
from muxproxy.errors import ClientError
from tests.corpus import reference


@dataclass
class Forwarded:
    head: RequestHead
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False


@dataclass
class Outcome:
    forwarded: list[Forwarded]
    error: ClientError | None


DEFAULT = HeadLimits()


def run_session(pieces: Sequence[bytes], limits: HeadLimits = DEFAULT) -> Outcome:
    """Feed ``pieces`` one ``receive_data`` each; answer every complete request with a 204."""
    s = ClientSession(limits)
    forwarded: list[Forwarded] = []
    try:
        for piece in pieces:
            s.receive_data(piece)
            while True:
                ev = s.next_event()
                if ev is NEED_DATA:
                    break
                if ev is CLOSED:
                    return Outcome(forwarded, None)
                if isinstance(ev, RequestHead):
                    forwarded.append(Forwarded(ev))
                elif isinstance(ev, Body):
                    forwarded[-1].body += ev.data
                elif isinstance(ev, EndOfRequest):
                    forwarded[-1].complete = True
                    s.response_head(204, [])
                    s.response_end()
                    if not s.start_next_cycle():
                        return Outcome(forwarded, None)
    except ClientError as exc:
        return Outcome(forwarded, exc)
    return Outcome(forwarded, None)


def reserialise(fwd: Forwarded) -> bytes:
    """The forwarded request as a real h11 client writes it (HTTP/1.1 only: h11 sends no 1.0)."""
    c = h11.Connection(h11.CLIENT)
    h = fwd.head
    out = c.send(h11.Request(method=h.method, target=h.target, headers=h.headers)) or b""
    if fwd.body:
        out += c.send(h11.Data(data=bytes(fwd.body))) or b""
    return out + (c.send(h11.EndOfMessage()) or b"")


def check(data: bytes, cuts: Sequence[int] = (), limits: HeadLimits = DEFAULT) -> Outcome:
    """Assert the invariant for ``data`` fed in pieces split at ``cuts``; return the outcome."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(points)]
    outcome = run_session(pieces, limits)
    ref = reference.parse(data)
    for i, fwd in enumerate(outcome.forwarded):
        assert i < len(ref.requests), (
            f"request {i} forwarded, but the reference stops before it ({ref.stop})"
        )
        want, head = ref.requests[i], fwd.head
        got = (head.method, head.target, head.authority, head.http_version, head.headers)
        expected = (want.method, want.target, want.authority, want.version, _h11_form(want))
        assert got == expected, f"request {i} read differently: {got!r} != {expected!r}"
        if fwd.complete:
            assert want.complete, f"request {i} forwarded whole, the reference: {ref.stop}"
            assert bytes(fwd.body) == want.body, f"request {i}: body differs"
        else:
            assert want.body.startswith(bytes(fwd.body)), f"request {i}: body prefix differs"
        if fwd.complete and head.http_version == b"1.1":
            again = run_session([reserialise(fwd)], limits)
            assert again.error is None and len(again.forwarded) == 1, again
            back = again.forwarded[0]
            assert (back.head.method, back.head.target, by_name(back.head.headers)) == (
                head.method,
                head.target,
                by_name(head.headers),
            )
            assert len(back.body) == len(fwd.body) and back.complete
    return outcome


def _h11_form(req: reference.Request) -> list[tuple[bytes, bytes]]:
    """h11 lower-cases the value of Transfer-Encoding (hop-by-hop: never forwarded anyway)."""
    return [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in req.headers]


def by_name(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Fields grouped by name, each name's values in order (h11's client writes Host first)."""
    return sorted(headers, key=lambda f: f[0])
