"""Generated request ids, and how the HPACK encoder carries a field unique to each request."""

from __future__ import annotations

import re

import pytest

from muxproxy.core.hpack_codec import Decoder, Encoder
from muxproxy.io.exchange import request_id


def test_request_ids_are_16_hex_digits_and_do_not_repeat() -> None:
    ids = [request_id() for _ in range(5000)]  # several refills of the random pool
    assert all(re.fullmatch(rb"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_per_request_field_bypasses_the_memo_and_round_trips() -> None:
    enc, dec = Encoder(), Decoder()
    fields = [(b":method", b"GET"), (b"x-request-id", request_id())]
    for _ in range(3):
        fields[1] = (b"x-request-id", request_id())
        headers, _, _ = dec.decode(enc.encode(fields))
        assert headers == fields
    assert (b"x-request-id", fields[1][1]) not in enc._cache  # not memoised
    # A client's value that is not plain letters and digits takes the checked path.
    assert dec.decode(enc.encode([(b"x-request-id", b"abc-123")]))[0] == [
        (b"x-request-id", b"abc-123")
    ]
    with pytest.raises(ValueError):
        enc.encode([(b"x-request-id", b"a\r\nb")])
