"""Head translation HTTP/1.1 ↔ HTTP/2: hop-by-hop removal and forwarding fields (DESIGN.md §3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxproxy.core.headers import (
    Forwarding,
    Header,
    request_to_h2,
    response_from_h2,
    trailers_from_h2,
)
from muxproxy.errors import BackendError

UNTRUSTED = Forwarding(client_ip="203.0.113.9", scheme=b"http", trusted=False)
TRUSTED = Forwarding(client_ip="10.0.0.2", scheme=b"https", trusted=True)
PSEUDO = [b":method", b":scheme", b":authority", b":path"]
ADDED = [b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"]
# Never forwarded from the client, whatever the Connection field says (te only as "trailers").
CONNECTION_SPECIFIC = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
    b"http2-settings",
    b"host",
}


def translate(
    headers: list[Header], fwd: Forwarding = UNTRUSTED, authority: bytes = b"app.test"
) -> list[Header]:
    return request_to_h2(b"GET", b"/p?q=1", authority, headers, fwd)


def regular(out: list[Header]) -> list[Header]:
    """The client's own fields: neither pseudo-headers nor the four the proxy appends."""
    return [(n, v) for n, v in out if n[:1] != b":" and n not in ADDED]


def test_simple_request() -> None:
    out = request_to_h2(
        b"POST",
        b"/upload",
        b"app.test:8080",
        [(b"host", b"app.test:8080"), (b"content-type", b"text/plain"), (b"content-length", b"3")],
        UNTRUSTED,
    )
    assert out == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"app.test:8080"),
        (b":path", b"/upload"),
        (b"content-type", b"text/plain"),
        (b"content-length", b"3"),
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"app.test:8080"),
        (b"via", b"1.1 muxproxy"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"host",
        b"te",
    ],
)
def test_hop_by_hop_fields_are_dropped(name: bytes) -> None:
    out = translate([(b"accept", b"*/*"), (name, b"gzip"), (b"user-agent", b"t")])
    assert regular(out) == [(b"accept", b"*/*"), (b"user-agent", b"t")]


@pytest.mark.parametrize("value", [b"trailers", b"Trailers", b" trailers "])
def test_te_trailers_is_kept(value: bytes) -> None:
    out = translate([(b"te", value), (b"accept", b"a")])
    assert regular(out) == [(b"te", b"trailers"), (b"accept", b"a")]


def test_te_named_in_connection_is_dropped_even_as_trailers() -> None:
    out = translate([(b"connection", b"te"), (b"te", b"trailers"), (b"accept", b"a")])
    assert regular(out) == [(b"accept", b"a")]


def test_fields_named_in_connection_are_dropped() -> None:
    out = translate(
        [
            (b"connection", b"keep-alive, X-Secret"),
            (b"x-secret", b"1"),
            (b"connection", b" Other ,,"),
            (b"other", b"2"),
            (b"x-kept", b"3"),
        ]
    )
    assert regular(out) == [(b"x-kept", b"3")]


def test_connection_naming_x_forwarded_for_cannot_remove_ours() -> None:
    out = translate(
        [(b"connection", b"X-Forwarded-For, via"), (b"x-forwarded-for", b"6.6.6.6"), (b"via", b"x")]
    )
    assert (b"x-forwarded-for", b"203.0.113.9") in out
    assert (b"via", b"1.1 muxproxy") in out
    assert [v for n, v in out if n == b"x-forwarded-for"] == [b"203.0.113.9"]
    assert [v for n, v in out if n == b"via"] == [b"1.1 muxproxy"]
    # the same when the peer is trusted: its own copy goes, ours stays
    out = translate(
        [(b"connection", b"x-forwarded-for"), (b"x-forwarded-for", b"1.1.1.1")], TRUSTED
    )
    assert [v for n, v in out if n == b"x-forwarded-for"] == [b"10.0.0.2"]


def test_pseudo_headers_first_and_in_order() -> None:
    out = request_to_h2(b"DELETE", b"/x", b"h", [(b"a", b"1")], TRUSTED)
    assert out[:4] == [
        (b":method", b"DELETE"),
        (b":scheme", b"https"),
        (b":authority", b"h"),
        (b":path", b"/x"),
    ]
    assert not any(n[:1] == b":" for n, _ in out[4:])


def test_multi_valued_fields_keep_their_order() -> None:
    fields = [
        (b"accept", b"a"),
        (b"cookie", b"c1"),
        (b"accept", b"b"),
        (b"set-thing", b"z"),
        (b"accept", b"c"),
        (b"cookie", b"c2"),
    ]
    assert regular(translate(fields)) == fields


def test_untrusted_forwarding_fields_are_replaced() -> None:
    out = translate(
        [
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil.test"),
            (b"forwarded", b"for=6.6.6.6"),
            (b"via", b"1.0 upstream"),
            (b"accept", b"a"),
        ]
    )
    assert regular(out) == [(b"accept", b"a")]
    assert out[-4:] == [
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"app.test"),
        (b"via", b"1.0 upstream, 1.1 muxproxy"),  # Via is a chain: ours is appended
    ]


def test_trusted_forwarding_fields_are_extended() -> None:
    out = translate(
        [
            (b"x-forwarded-for", b"198.51.100.1"),
            (b"x-forwarded-for", b"198.51.100.2, 10.0.0.1"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"public.test"),
            (b"forwarded", b"for=198.51.100.1"),
        ],
        TRUSTED,
    )
    assert regular(out) == [(b"forwarded", b"for=198.51.100.1")]
    assert out[-4:] == [
        (b"x-forwarded-for", b"198.51.100.1, 198.51.100.2, 10.0.0.1, 10.0.0.2"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"public.test"),
        (b"via", b"1.1 muxproxy"),
    ]


def test_trusted_without_incoming_fields_adds_ours() -> None:
    out = translate([], TRUSTED, authority=b"h:1")
    assert out[-4:] == [
        (b"x-forwarded-for", b"10.0.0.2"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"h:1"),
        (b"via", b"1.1 muxproxy"),
    ]


def test_via_names_the_client_http_version() -> None:
    out = request_to_h2(b"GET", b"/", b"h", [], UNTRUSTED, b"1.0")
    assert out[-1] == (b"via", b"1.0 muxproxy")


def test_extra_drop() -> None:
    out = request_to_h2(
        b"GET",
        b"/",
        b"h",
        [(b"sec-websocket-key", b"k"), (b"a", b"1")],
        UNTRUSTED,
        extra_drop=frozenset({b"sec-websocket-key"}),
    )
    assert regular(out) == [(b"a", b"1")]


# --- property tests ----------------------------------------------------------------------------

SPECIAL_NAMES = [
    *sorted(CONNECTION_SPECIFIC),
    *(b"te", b"expect", b"via", b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"),
    *(b"x-forwarded-host", b"accept", b"cookie", b"x-a", b"x-b", b"content-length"),
]
NAMES = st.sampled_from(SPECIAL_NAMES) | st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~", min_size=1, max_size=8
).map(str.encode)
VALUES = st.binary(max_size=12).filter(lambda v: not set(v) & {0, 10, 13})
CONNECTION_VALUES = st.lists(
    NAMES.map(lambda n: n.decode()).flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()])),
    max_size=3,
).map(lambda tokens: ", ".join(tokens).encode())


@st.composite
def header_lists(draw: st.DrawFn) -> list[Header]:
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=12))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(fields)))
        fields.insert(at, (b"connection", draw(CONNECTION_VALUES)))
    return fields


def _named(headers: list[Header]) -> set[bytes]:
    out = set()
    for n, v in headers:
        if n == b"connection":
            out |= {t.strip().lower() for t in v.split(b",") if t.strip()}
    return out


def _expected_regular(headers: list[Header], fwd: Forwarding) -> list[Header]:
    """An independent model of which client fields survive, in order."""
    named = _named(headers)
    kept = []
    for n, v in headers:
        if n in CONNECTION_SPECIFIC or n in named or n == b"expect" or n == b"via":
            continue
        if n == b"te":
            if v.strip().lower() == b"trailers":
                kept.append((n, b"trailers"))
            continue
        if n in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
            continue
        if n == b"forwarded" and not fwd.trusted:
            continue
        kept.append((n, v))
    return kept


@given(header_lists(), st.booleans())
def test_property_request_translation(headers: list[Header], trusted: bool) -> None:
    fwd = TRUSTED if trusted else UNTRUSTED
    out = translate(headers, fwd)
    names = [n for n, _ in out]
    # pseudo-headers first, exactly once each
    assert names[:4] == PSEUDO
    assert not any(n[:1] == b":" for n in names[4:])
    # no connection-specific field, none named by Connection (bar the four the proxy adds)
    named = _named(headers)
    for n, v in out[4:-4]:
        assert n not in CONNECTION_SPECIFIC
        assert n not in named
        assert n != b"te" or v == b"trailers"
    # the proxy's own fields, once each, at the end
    assert names[-4:] == ADDED
    assert all(names.count(n) == 1 for n in ADDED)
    assert out[-4][1].endswith(fwd.client_ip.encode())
    # every surviving regular field, in the original relative order
    assert out[4:-4] == _expected_regular(headers, fwd)


# --- responses ---------------------------------------------------------------------------------


def test_response_translation() -> None:
    status, fields = response_from_h2(
        [
            (b":status", b"200"),
            (b"content-type", b"text/html"),
            (b"set-cookie", b"a=1"),
            (b"connection", b"close"),
            (b"keep-alive", b"timeout=5"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"set-cookie", b"b=2"),
            (b"x-tab", b"a\tb"),
            (b"x-utf8", "é".encode()),
        ]
    )
    assert status == 200
    assert fields == [
        (b"content-type", b"text/html"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-tab", b"a\tb"),
        (b"x-utf8", "é".encode()),
    ]


@pytest.mark.parametrize("status", [b"100", b"204", b"304", b"418", b"599"])
def test_good_status(status: bytes) -> None:
    assert response_from_h2([(b":status", status)]) == (int(status), [])


@pytest.mark.parametrize(
    "status", [b"20", b"2000", b"abc", b"20a", b" 20", b"099", b"000", b"600", b"999", b"101", b""]
)
def test_bad_status(status: bytes) -> None:
    with pytest.raises(BackendError) as info:
        response_from_h2([(b":status", status), (b"a", b"b")])
    assert info.value.status_hint == 502


def test_missing_status() -> None:
    with pytest.raises(BackendError):
        response_from_h2([(b"content-type", b"text/plain")])


def test_101_only_when_allowed() -> None:
    assert response_from_h2([(b":status", b"101")], allow_101=True) == (101, [])


@pytest.mark.parametrize(
    "value",
    [b"a\r\nx-injected: 1", b"a\nb", b"a\rb", b"a\x00b", b"\x01", b"a\x1fb", b"\x7f", b"\x0b"],
)
def test_control_characters_in_response_values(value: bytes) -> None:
    with pytest.raises(BackendError) as info:
        response_from_h2([(b":status", b"200"), (b"x-evil", value)])
    assert info.value.status_hint == 502


@pytest.mark.parametrize("name", [b"bad name", b"x:y", b"Upper", b"", b"a\r\nb"])
def test_bad_response_field_names(name: bytes) -> None:
    with pytest.raises(BackendError):
        response_from_h2([(b":status", b"200"), (name, b"v")])


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"x-a", b"set-cookie", b"connection", b"date"]),
            st.binary(max_size=8),
        ),
        max_size=8,
    )
)
def test_property_response_never_emits_control_characters(fields: list[Header]) -> None:
    try:
        status, out = response_from_h2([(b":status", b"200"), *fields])
    except BackendError:
        return
    assert status == 200
    for name, value in out:
        assert name != b"connection"
        assert not any((c < 0x20 and c != 0x09) or c == 0x7F for c in value)


def test_trailers() -> None:
    assert trailers_from_h2(
        [
            (b"grpc-status", b"0"),
            (b":status", b"200"),
            (b"content-length", b"5"),
            (b"host", b"h"),
            (b"connection", b"close"),
            (b"trailer", b"x"),
            (b"x-bad", b"a\r\nb"),
            (b"Bad", b"v"),
            (b"x-checksum", b"abc"),
        ]
    ) == [(b"grpc-status", b"0"), (b"x-checksum", b"abc")]
