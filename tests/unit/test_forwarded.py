"""RFC 7239 Forwarded and the X-Forwarded-* fields, per listener mode (core/forwarded.py):
byte strings in, byte strings out; one trust rule (extend from a trusted peer, else replace)."""

from __future__ import annotations

from typing import get_args, get_type_hints

import pytest

from muxproxy.config import ListenerConfig
from muxproxy.core.forwarded import (
    EXTENDED,
    Forwarding,
    forwarded_element,
    node,
    parse_forwarded,
    quote,
)
from muxproxy.core.headers import Header, request_to_h2


def fwd(mode: str, *, ip: str = "203.0.113.9", trusted: bool = False) -> Forwarding:
    return Forwarding(client_ip=ip, scheme=b"https", trusted=trusted, mode=mode)


def added(headers: list[Header], f: Forwarding, authority: bytes = b"app.test") -> list[Header]:
    """The forwarding fields (and the client's own, passed on) of the translated head."""
    out = request_to_h2(b"GET", b"/", authority, headers, f)
    return [(n, v) for n, v in out if n in (b"forwarded", b"x-forwarded-for",
                                            b"x-forwarded-proto", b"x-forwarded-host")]


def test_the_config_modes_are_the_core_modes() -> None:
    hint = get_type_hints(ListenerConfig)["forwarded"]
    assert set(get_args(hint)) == set(EXTENDED)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("192.0.2.43", b"192.0.2.43"),
        ("2001:db8:cafe::17", b'"[2001:db8:cafe::17]"'),  # RFC 7239 §6: bracketed and quoted
        ("2001:0db8:0000::0017", b'"[2001:db8::17]"'),  # (compressed form)
        ("::ffff:192.0.2.1", b'"[::ffff:c000:201]"'),
        ("", b"unknown"),  # §6.2: an address that is not known
        ("unix-socket", b"unknown"),
    ],
)
def test_node(ip: str, expected: bytes) -> None:
    assert node(ip) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"example.com", b"example.com"),
        (b"example.com:8080", b'"example.com:8080"'),  # ":" is not a token character
        (b"[::1]:443", b'"[::1]:443"'),
        (b'a"b\\c', b'"a\\"b\\\\c"'),
    ],
)
def test_quote(value: bytes, expected: bytes) -> None:
    assert quote(value) == expected


def test_element() -> None:
    assert forwarded_element(fwd("rfc7239"), b"a.example:8443") == (
        b'for=203.0.113.9;proto=https;host="a.example:8443"'
    )
    assert forwarded_element(fwd("rfc7239", ip="2001:db8::1"), b"") == (
        b'for="[2001:db8::1]";proto=https'
    )


@pytest.mark.parametrize(
    "value",
    [
        b"for=192.0.2.60;proto=http;by=203.0.113.43",  # RFC 7239 §4 examples
        b'for="_gazonk"',
        b'For="[2001:db8:cafe::17]:4711"',
        b"for=192.0.2.43, for=198.51.100.17",
        b"for=unknown",
        b'for="unknown:_hidden"',
        b"for=_hidden;by=_SEVKISEK",
        b'for="192.0.2.43:47011"',
        b'host="a.example:8080";proto=https',
        b"for=192.0.2.43,, for=198.51.100.17",  # empty list elements are allowed
        b'ext="quoted \\"escape\\" ok"',
        b"for=192.0.2.43;",
    ],
)
def test_parse_accepts(value: bytes) -> None:
    assert parse_forwarded(value)


@pytest.mark.parametrize(
    "value",
    [
        b"for=2001:db8::1",  # IPv6 must be bracketed (and so quoted)
        b"for=[2001:db8::1]",  # brackets are not token characters
        b'for="[2001:db8::1"',
        b'for="[not-v6]"',
        b"for=300.1.1.1",
        b'for="192.0.2.43:99999"',
        b'for="192.0.2.43:"',
        b"for=evil.example",  # a node is an IP, unknown or _obfuscated
        b"for=192.0.2.43;for=192.0.2.44",  # a parameter twice in one element
        b"for",
        b"=x",
        b'for="unterminated',
        b"for=a b",
        b"host=a:b",  # unquoted ":"
        b";",
    ],
)
def test_parse_refuses(value: bytes) -> None:
    assert parse_forwarded(value) is None


def test_parse_gives_the_elements() -> None:
    assert parse_forwarded(b'for="[2001:db8::1]:80";Proto=http, for=unknown') == [
        [("for", b"[2001:db8::1]:80"), ("proto", b"http")],
        [("for", b"unknown")],
    ]


INCOMING = [
    (b"x-forwarded-for", b"198.51.100.1"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-host", b"public.test"),
    (b"forwarded", b"for=198.51.100.1;proto=http"),
    (b"forwarded", b'for="[2001:db8::5]"'),
]


def test_rfc7239_untrusted_replaces_everything() -> None:
    assert added(INCOMING, fwd("rfc7239")) == [
        (b"forwarded", b"for=203.0.113.9;proto=https;host=app.test"),
    ]


def test_rfc7239_trusted_extends_forwarded_and_passes_x_forwarded_as_is() -> None:
    assert added(INCOMING, fwd("rfc7239", ip="10.0.0.2", trusted=True)) == [
        (b"x-forwarded-for", b"198.51.100.1"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"public.test"),
        (
            b"forwarded",
            b'for=198.51.100.1;proto=http, for="[2001:db8::5]", '
            b"for=10.0.0.2;proto=https;host=app.test",
        ),
    ]


def test_rfc7239_trusted_but_malformed_incoming_is_replaced() -> None:
    got = added([(b"forwarded", b"for=evil.example")], fwd("rfc7239", trusted=True))
    assert got == [(b"forwarded", b"for=203.0.113.9;proto=https;host=app.test")]


def test_both_untrusted() -> None:
    assert added(INCOMING, fwd("both", ip="2001:db8::9"), b"a.example:8443") == [
        (b"x-forwarded-for", b"2001:db8::9"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"a.example:8443"),
        (b"forwarded", b'for="[2001:db8::9]";proto=https;host="a.example:8443"'),
    ]


def test_both_trusted_extends_both() -> None:
    assert added(INCOMING, fwd("both", ip="10.0.0.2", trusted=True)) == [
        (b"x-forwarded-for", b"198.51.100.1, 10.0.0.2"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"public.test"),
        (
            b"forwarded",
            b'for=198.51.100.1;proto=http, for="[2001:db8::5]", '
            b"for=10.0.0.2;proto=https;host=app.test",
        ),
    ]


def test_x_forwarded_default_is_unchanged() -> None:
    """The default mode is what the proxy always did: X-Forwarded-* extended from a trusted
    peer, a trusted Forwarded passed on as it came, an untrusted one dropped."""
    assert Forwarding("1.2.3.4", b"http", False).mode == "x-forwarded"
    assert added(INCOMING, fwd("x-forwarded")) == [
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"app.test"),
    ]
    assert added(INCOMING, fwd("x-forwarded", ip="10.0.0.2", trusted=True)) == [
        (b"forwarded", b"for=198.51.100.1;proto=http"),
        (b"forwarded", b'for="[2001:db8::5]"'),
        (b"x-forwarded-for", b"198.51.100.1, 10.0.0.2"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"public.test"),
    ]


def test_no_authority_no_host_parameter() -> None:
    assert added([], fwd("rfc7239"), b"") == [(b"forwarded", b"for=203.0.113.9;proto=https")]


def test_connection_naming_forwarded_cannot_remove_ours() -> None:
    got = added([(b"connection", b"forwarded"), (b"forwarded", b"for=1.1.1.1")],
                fwd("rfc7239", ip="10.0.0.2", trusted=True))
    assert got == [(b"forwarded", b"for=10.0.0.2;proto=https;host=app.test")]
