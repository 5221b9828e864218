"""Differential test of muxproxy's HTTP/2 client codec against h2's client role.

A hypothesis state machine plays a server: every frame type, padding, CONTINUATION splits,
SETTINGS changes, window edges, GOAWAY, RST_STREAM, invalid HPACK, and byte mutations of
valid frames.  After each frame both codecs must agree (:mod:`tests.fuzz.h2diff`), or differ
in one of the documented ways of ``h2diff.KNOWN``; after a documented difference or a
connection error on both sides the run ends.  CI runs a few thousand steps; for hours:

    HYPOTHESIS_PROFILE=h2diff-long python -m pytest tests/fuzz/test_h2_differential.py
    python -m tests.fuzz.fuzz_h2diff /tmp/h2diff-corpus -max_total_time=14400   # atheris
"""

from __future__ import annotations

import os
import struct

import hpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .h2diff import KNOWN, Observation, Pair, classify

settings.register_profile(
    "h2diff-long", max_examples=1_000_000, stateful_step_count=100, deadline=None
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def frame(type_: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, type_, flags, sid) + payload


SIDS = st.sampled_from([1, 3, 5, 1, 3, 5, 0, 2, 7, 9, 2**31 - 1])
CODES = st.sampled_from([0, 1, 2, 3, 5, 7, 8, 11, 0x1234])
STATUS = st.sampled_from([b"200", b"200", b"204", b"304", b"404", b"100", b"103", b"101", b"2x0"])
FIELDS = st.lists(
    st.sampled_from(
        [
            (b"content-type", b"text/plain"),
            (b"server", b"nginx"),
            (b"content-length", b"0"),
            (b"content-length", b"3"),
            (b"content-length", b"x"),
            (b"set-cookie", b"a=1"),
            (b"connection", b"close"),
            (b"te", b"trailers"),
            (b"te", b"gzip"),
            (b"X-Upper", b"1"),
            (b"x-ctl", b"a\x00b"),
            (b"x-lead", b" a"),
            (b":path", b"/"),
            (b"x-long", b"v" * 3000),
        ]
    ),
    max_size=4,
)
SETTING = st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 6, 8, 0x99]),
    st.sampled_from([0, 1, 100, 16384, 65535, 65536, 2**24 - 1, 2**31 - 1, 2**31, 2**32 - 1]),
)


class H2Differential(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.encoder = hpack.Encoder()
        self.done = False
        self.last: tuple[Observation, Observation] | None = None

    def feed(self, data: bytes, what: str, sid: int = 0) -> None:
        closed = self.pair.closed_in_mux(sid)
        diffs, m, r = self.pair.feed(data)
        if diffs:
            label = classify(what, m, r, diffs, closed=closed)
            assert label in KNOWN, f"after {what}: {diffs}"
            self.done = True
        elif not m.alive:
            self.done = True  # both failed the connection

    @initialize(entries=st.lists(SETTING, max_size=3))
    def server_settings(self, entries: list[tuple[int, int]]) -> None:
        payload = b"".join(struct.pack(">HL", k, v) for k, v in entries)
        self.feed(frame(4, 0, 0, payload), "SETTINGS")

    def block(self, fields: list[tuple[bytes, bytes]], bad_hpack: bytes | None) -> bytes:
        return bad_hpack if bad_hpack is not None else self.encoder.encode(fields)

    @precondition(lambda self: not self.done)
    @rule(
        sid=SIDS,
        status=STATUS,
        fields=FIELDS,
        trailers=st.booleans(),
        end=st.booleans(),
        pad=st.none() | st.integers(0, 20),
        priority=st.booleans(),
        pieces=st.integers(1, 4),
        bad_hpack=st.none() | st.binary(min_size=1, max_size=8),
    )
    def headers(
        self,
        sid: int,
        status: bytes,
        fields: list[tuple[bytes, bytes]],
        trailers: bool,
        end: bool,
        pad: int | None,
        priority: bool,
        pieces: int,
        bad_hpack: bytes | None,
    ) -> None:
        head = fields if trailers else [(b":status", status), *fields]
        block = self.block(head, bad_hpack)
        step = max(1, -(-len(block) // pieces))
        parts = [block[i : i + step] for i in range(0, len(block), step)] or [b""]
        first = parts[0]
        flags = (1 if end else 0) | (4 if len(parts) == 1 else 0)
        if priority:
            first = b"\x00\x00\x00\x00\x10" + first
            flags |= 0x20
        if pad is not None:
            first = bytes([pad]) + first + b"\x00" * pad
            flags |= 0x8
        data = frame(1, flags, sid, first)
        for i, p in enumerate(parts[1:], 2):
            data += frame(9, 4 if i == len(parts) else 0, sid, p)
        self.feed(data, "HEADERS", sid)

    @precondition(lambda self: not self.done)
    @rule(
        sid=SIDS,
        n=st.sampled_from([0, 1, 3, 100, 16384]),
        end=st.booleans(),
        pad=st.none() | st.integers(0, 255),
    )
    def data(self, sid: int, n: int, end: bool, pad: int | None) -> None:
        payload = bytes(i & 0xFF for i in range(n))
        flags = 1 if end else 0
        if pad is not None:
            payload = bytes([pad]) + payload + b"\x00" * pad
            flags |= 0x8
        if len(payload) > 16384:
            payload = payload[:16384]
        self.feed(frame(0, flags, sid, payload), "DATA", sid)

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, code=CODES, size=st.sampled_from([4, 4, 4, 3, 8]))
    def rst(self, sid: int, code: int, size: int) -> None:
        self.feed(frame(3, 0, sid, struct.pack(">L", code)[:size].ljust(size, b"\0")), "RST", sid)

    @precondition(lambda self: not self.done)
    @rule(entries=st.lists(SETTING, max_size=3), ack=st.booleans(), sid=st.sampled_from([0, 0, 1]))
    def settings_frame(self, entries: list[tuple[int, int]], ack: bool, sid: int) -> None:
        payload = b"" if ack else b"".join(struct.pack(">HL", k, v) for k, v in entries)
        self.feed(frame(4, 1 if ack else 0, sid, payload), "SETTINGS")

    @precondition(lambda self: not self.done)
    @rule(last=st.sampled_from([0, 1, 3, 5, 2**31 - 1]), code=CODES, sid=st.sampled_from([0, 0, 1]))
    def goaway(self, last: int, code: int, sid: int) -> None:
        self.feed(frame(7, 0, sid, struct.pack(">LL", last, code) + b"debug"), "GOAWAY")

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, inc=st.sampled_from([0, 1, 1000, 2**31 - 1]))
    def window_update(self, sid: int, inc: int) -> None:
        self.feed(frame(8, 0, sid, struct.pack(">L", inc)), "WINDOW_UPDATE", sid)

    @precondition(lambda self: not self.done)
    @rule(ack=st.booleans(), size=st.sampled_from([8, 8, 7]), sid=st.sampled_from([0, 0, 1]))
    def ping(self, ack: bool, size: int, sid: int) -> None:
        self.feed(frame(6, 1 if ack else 0, sid, b"p" * size), "PING")

    @precondition(lambda self: not self.done)
    @rule(sid=SIDS, type_=st.sampled_from([2, 5, 0x0A, 0x20]), payload=st.binary(max_size=10))
    def other(self, sid: int, type_: int, payload: bytes) -> None:
        self.feed(frame(type_, 0, sid, payload), f"type {type_}", sid)

    @precondition(lambda self: not self.done)
    @rule(sid=st.sampled_from([1, 3, 5]), pos=st.integers(0, 60), byte=st.integers(0, 255))
    def mutated(self, sid: int, pos: int, byte: int) -> None:
        data = bytearray(
            frame(1, 4, sid, self.encoder.encode([(b":status", b"200"), (b"x", b"y" * 20)]))
        )
        data[pos % len(data)] = byte
        self.feed(bytes(data), "mutated HEADERS", sid)

    @precondition(lambda self: self.done)
    @rule()
    def finished(self) -> None:
        """Nothing more to compare once both failed or they diverged in a known way."""

    @invariant()
    def codec_state_is_bounded(self) -> None:
        core = self.pair.mux.core
        assert len(core.streams) <= 3


H2Differential.TestCase.settings = settings(
    PROFILE,
    max_examples=PROFILE.max_examples if PROFILE.max_examples > 1000 else 300,
    stateful_step_count=PROFILE.stateful_step_count if PROFILE.stateful_step_count > 50 else 12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestH2Differential = H2Differential.TestCase
