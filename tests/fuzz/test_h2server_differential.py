"""Differential test of muxproxy's HTTP/2 server codec (core/frontend_h2.py) against h2's
server role.

A hypothesis state machine plays a client: request heads valid and malformed (RFC 9113 §8.2,
§8.3), trailers, padding, PRIORITY (flag and frame, self-dependency), CONTINUATION splits,
DATA against content-length and the windows, SETTINGS (INITIAL_WINDOW_SIZE changes, ACKs,
bad values), WINDOW_UPDATE edges, RST_STREAM, PING, GOAWAY, PUSH_PROMISE, unknown frames,
invalid HPACK; and the server answers or resets streams in between.  After each step both
codecs must agree (:mod:`tests.fuzz.h2server_diff`) or differ in one of the documented ways
of ``h2server_diff.KNOWN``; after a documented difference or a connection error on both
sides the run ends.  CI runs a few hundred examples; for hours:

    HYPOTHESIS_PROFILE=h2diff-long python -m pytest tests/fuzz/test_h2server_differential.py
"""

from __future__ import annotations

import os
import struct

import hpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from muxproxy.core.h2wire import PREFACE

from .h2server_diff import KNOWN, WINDOW, Pair, classify

settings.register_profile(
    "h2diff-long", max_examples=1_000_000, stateful_step_count=100, deadline=None
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def frame(type_: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, type_, flags, sid) + payload


SIDS = st.sampled_from([1, 3, 5, 7, 1, 3, 5, 7, 0, 2, 9, 2**31 - 1])
OPEN_SIDS = st.sampled_from([1, 3, 5, 7])
CODES = st.sampled_from([0, 1, 2, 5, 7, 8, 11, 0x1234])
PSEUDO = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.test"),
    (b":path", b"/p"),
]
HEAD_VARIANTS = st.sampled_from(
    [
        "ok", "ok", "ok", "post", "host-only", "host-same", "host-differs", "no-method",
        "no-path", "no-scheme", "dup-path", "pseudo-after", "unknown-pseudo", "status",
        "empty-path", "star-path", "relative-path", "ftp-scheme", "connect", "connect-ws",
        "no-authority",
    ]
)  # fmt: skip
EXTRA = st.lists(
    st.sampled_from(
        [
            (b"accept", b"*/*"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            (b"content-length", b"0"),
            (b"content-length", b"5"),
            (b"content-length", b"x"),
            (b"connection", b"close"),
            (b"keep-alive", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"proxy-connection", b"x"),
            (b"te", b"trailers"),
            (b"te", b"gzip"),
            (b"X-Upper", b"1"),
            (b"x-ctl", b"a\x00b"),
            (b"x-crlf", b"a\r\nb"),
            (b"x-lead", b" a"),
            (b"x-trail", b"a\t"),
            (b"x-long", b"v" * 3000),
            (b"x y", b"1"),
        ]
    ),
    max_size=3,
)
TRAILER_FIELDS = st.lists(
    st.sampled_from(
        [
            (b"grpc-status", b"0"),
            (b"x-t", b"1"),
            (b":path", b"/"),
            (b"connection", b"close"),
            (b"X-Up", b"1"),
            (b"content-length", b"3"),
        ]
    ),
    min_size=1,
    max_size=2,
)
SETTING = st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 6, 8, 0x99]),
    st.sampled_from([0, 1, 2, 100, 16384, 65535, 65536, 2**24 - 1, 2**31 - 1, 2**31, 2**32 - 1]),
)


def head(variant: str, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    m, s, a, p = PSEUDO
    v = {
        "ok": [m, s, a, p],
        "post": [(b":method", b"POST"), s, a, p],
        "host-only": [m, s, p, (b"host", b"h.test")],
        "host-same": [m, s, a, p, (b"host", b"a.test")],
        "host-differs": [m, s, a, p, (b"host", b"b.test")],
        "no-method": [s, a, p],
        "no-path": [m, s, a],
        "no-scheme": [m, a, p],
        "dup-path": [m, s, a, p, p],
        "pseudo-after": [m, s, a, (b"accept", b"*/*"), p],
        "unknown-pseudo": [m, s, a, p, (b":foo", b"1")],
        "status": [m, s, a, p, (b":status", b"200")],
        "empty-path": [m, s, a, (b":path", b"")],
        "star-path": [(b":method", b"OPTIONS"), s, a, (b":path", b"*")],
        "relative-path": [m, s, a, (b":path", b"p")],
        "ftp-scheme": [m, (b":scheme", b"ftp"), a, p],
        "connect": [(b":method", b"CONNECT"), (b":authority", b"a.test:443")],
        "connect-ws": [(b":method", b"CONNECT"), (b":protocol", b"websocket"), s, a, p],
        "no-authority": [m, s, p],
    }[variant]
    return v + extra


class H2ServerDifferential(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.encoder = hpack.Encoder()
        self.done = False
        self.history: dict[int, str] = {}

    def feed(self, data: bytes, what: str) -> None:
        diffs, m, r = self.pair.feed(data)
        if diffs:
            label = classify(what, m, r, self.history)
            assert label in KNOWN, f"after {what}: {diffs} -> {label}"
            self.done = True
        elif not m.alive:
            self.done = True  # both failed the connection

    @initialize(entries=st.lists(SETTING, max_size=2), ack=st.booleans())
    def preface(self, entries: list[tuple[int, int]], ack: bool) -> None:
        # (only settings both take: the rule for bad values is settings_frame)
        ok = [(k, v) for k, v in entries if k not in (2, 4, 5, 8) or (k == 4 and v < 2**31)]
        payload = b"".join(struct.pack(">HL", k, v) for k, v in ok)
        data = PREFACE + frame(4, 0, 0, payload)
        if ack:
            data += frame(4, 1, 0)
        self.feed(data, "preface")

    @precondition(lambda self: not self.done)
    @rule(
        sid=SIDS,
        variant=HEAD_VARIANTS,
        extra=EXTRA,
        end=st.booleans(),
        pad=st.none() | st.integers(0, 20),
        priority=st.none() | st.sampled_from([0, 1, 3, 5, 7]),
        pieces=st.integers(1, 4),
        bad_hpack=st.none() | st.binary(min_size=1, max_size=8),
    )
    def headers(
        self,
        sid: int,
        variant: str,
        extra: list[tuple[bytes, bytes]],
        end: bool,
        pad: int | None,
        priority: int | None,
        pieces: int,
        bad_hpack: bytes | None,
    ) -> None:
        what = f"HEADERS[{variant}]"
        if any(n == b"content-length" for n, _ in extra):
            what += "+content-length"
        self._block(sid, head(variant, extra), end, pad, priority, pieces, bad_hpack, what)

    @precondition(lambda self: not self.done)
    @rule(sid=OPEN_SIDS, fields=TRAILER_FIELDS, end=st.booleans(), pieces=st.integers(1, 2))
    def trailers(self, sid: int, fields: list[tuple[bytes, bytes]], end: bool, pieces: int) -> None:
        self._block(sid, fields, end, None, None, pieces, None, "trailers")

    def _block(
        self,
        sid: int,
        fields: list[tuple[bytes, bytes]],
        end: bool,
        pad: int | None,
        priority: int | None,
        pieces: int,
        bad_hpack: bytes | None,
        what: str,
    ) -> None:
        block = bad_hpack if bad_hpack is not None else self.encoder.encode(fields)
        step = max(1, -(-len(block) // pieces))
        parts = [block[i : i + step] for i in range(0, len(block), step)] or [b""]
        first = parts[0]
        flags = (1 if end else 0) | (4 if len(parts) == 1 else 0)
        if priority is not None:
            first = struct.pack(">LB", priority, 16) + first
            flags |= 0x20
        if pad is not None:
            first = bytes([pad]) + first + b"\x00" * pad
            flags |= 0x8
        data = frame(1, flags, sid, first)
        for i, p in enumerate(parts[1:], 2):
            data += frame(9, 4 if i == len(parts) else 0, sid, p)
        self.feed(data, f"{what} {sid}")

    @precondition(lambda self: not self.done)
    @rule(
        sid=SIDS,
        n=st.sampled_from([0, 1, 5, 100, 16384]),
        end=st.booleans(),
        pad=st.none() | st.integers(0, 255),
    )
    def data(self, sid: int, n: int, end: bool, pad: int | None) -> None:
        payload = bytes(i & 0xFF for i in range(n))
        flags = 1 if end else 0
        if pad is not None:
            payload = bytes([pad]) + payload + b"\x00" * pad
            flags |= 0x8
        self.feed(frame(0, flags, sid, payload[:16384]), f"DATA {sid}")

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, code=CODES, size=st.sampled_from([4, 4, 4, 3, 8]))
    def rst(self, sid: int, code: int, size: int) -> None:
        payload = struct.pack(">L", code)[:size].ljust(size, b"\0")
        self.feed(frame(3, 0, sid, payload), f"RST_STREAM {sid}")

    @precondition(lambda self: not self.done)
    @rule(entries=st.lists(SETTING, max_size=3), ack=st.booleans(), sid=st.sampled_from([0, 0, 1]))
    def settings_frame(self, entries: list[tuple[int, int]], ack: bool, sid: int) -> None:
        payload = b"" if ack else b"".join(struct.pack(">HL", k, v) for k, v in entries)
        self.feed(frame(4, 1 if ack else 0, sid, payload), "SETTINGS")

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, inc=st.sampled_from([0, 1, 1000, WINDOW, 2**31 - 1]))
    def window_update(self, sid: int, inc: int) -> None:
        self.feed(frame(8, 0, sid, struct.pack(">L", inc)), f"WINDOW_UPDATE {sid}")

    @precondition(lambda self: not self.done)
    @rule(ack=st.booleans(), size=st.sampled_from([8, 8, 7]), sid=st.sampled_from([0, 0, 1]))
    def ping(self, ack: bool, size: int, sid: int) -> None:
        self.feed(frame(6, 1 if ack else 0, sid, b"p" * size), "PING")

    @precondition(lambda self: not self.done)
    @rule(last=st.sampled_from([0, 1, 3]), code=CODES, sid=st.sampled_from([0, 0, 1]))
    def goaway(self, last: int, code: int, sid: int) -> None:
        self.feed(frame(7, 0, sid, struct.pack(">LL", last, code) + b"debug"), "GOAWAY")

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, dep=st.sampled_from([0, 1, 3, 5, 7]), size=st.sampled_from([5, 5, 4, 6]))
    def priority(self, sid: int, dep: int, size: int) -> None:
        payload = struct.pack(">LB", dep, 16)[:size].ljust(size, b"\0")
        self.feed(frame(2, 0, sid, payload), f"PRIORITY {sid}")

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, type_=st.sampled_from([5, 0x0A, 0x20]), payload=st.binary(max_size=10))
    def other(self, sid: int, type_: int, payload: bytes) -> None:
        self.feed(frame(type_, 0, sid, payload), f"type {type_} {sid}")

    @precondition(lambda self: not self.done)
    @rule(sid=OPEN_SIDS)
    def respond(self, sid: int) -> None:
        if self.pair.respond(sid):
            self.history[sid] = "responded"
            self.feed(b"", f"respond {sid}")

    @precondition(lambda self: not self.done)
    @rule(sid=OPEN_SIDS)
    def reset(self, sid: int) -> None:
        if self.pair.reset(sid):
            self.history[sid] = "reset"
            self.feed(b"", f"reset {sid}")

    @precondition(lambda self: self.done)
    @rule()
    def finished(self) -> None:
        """Nothing more to compare once both failed or they diverged in a known way."""

    @invariant()
    def codec_state_is_bounded(self) -> None:
        core = self.pair.mux.core
        assert len(core.streams) <= 6
        assert core._recv_unacked_conn >= 0


H2ServerDifferential.TestCase.settings = settings(
    PROFILE,
    max_examples=PROFILE.max_examples if PROFILE.max_examples > 1000 else 400,
    stateful_step_count=PROFILE.stateful_step_count if PROFILE.stateful_step_count > 50 else 15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestH2ServerDifferential = H2ServerDifferential.TestCase
