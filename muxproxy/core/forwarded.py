"""The forwarding fields a proxy adds: X-Forwarded-For/-Proto/-Host and RFC 7239 ``Forwarded``.

Theory of operation
-------------------
A listener chooses what the backend is told about the client (``forwarded`` in the config):
``"x-forwarded"`` (the de-facto fields, the default), ``"rfc7239"`` (one ``Forwarded``
element per hop) or ``"both"``.  One trust rule governs both kinds, the listener's
``trusted_proxies``: from a trusted peer the incoming fields are *extended* (its
X-Forwarded-For chain gets our client appended, its Forwarded list gets our element appended),
from anyone else they are *replaced*, so a client can never forge its own address.  The kind
of field a listener does not generate is passed on unchanged from a trusted peer and dropped
from an untrusted one.

Our ``Forwarded`` element is ``for=NODE;proto=SCHEME;host=AUTHORITY`` (RFC 7239 §5):

* ``for``: an IPv4 address bare, an IPv6 address bracketed and quoted
  (``for="[2001:db8::1]"``, §6), ``unknown`` when the address is not an IP (§6.2);
* ``proto``: the listener's scheme; ``host``: the authority the client asked for, quoted
  when it is not a token (``host="a.example:8080"``), left out when there is none.

An incoming ``Forwarded`` from a trusted peer is checked against the grammar of §4 (a list
of ``;``-separated ``token=value`` pairs, values tokens or quoted strings) and the node syntax
of §6 for ``for``/``by`` (IP, ``unknown``, or an obfuscated ``_name``, each with an optional
port or ``_obfport``).  A value that does not parse is dropped rather than extended: a backend
reading the chain must be able to trust its syntax.

Everything here is pure: bytes in, bytes out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "EXTENDED",
    "Forwarding",
    "forwarded_element",
    "forwarding_fields",
    "node",
    "parse_forwarded",
    "quote",
]

Header = tuple[bytes, bytes]

@dataclass(frozen=True, slots=True)
class Forwarding:
    """What the proxy adds to every forwarded request."""

    client_ip: str
    scheme: bytes  # b"http" | b"https": the listener's scheme
    trusted: bool  # peer is in trusted_proxies: keep and extend incoming forwarding fields
    via: bytes = b"muxproxy"
    mode: str = "x-forwarded"  # a key of EXTENDED: the listener's `forwarded`


# RFC 9110 §5.6.2 token characters.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.6.4 quoted-string (qdtext and quoted-pair), without the quotes.
_QUOTED = re.compile(rb'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"')
_OBF = re.compile(rb"_[A-Za-z0-9._-]+")
_PORT = re.compile(rb"[0-9]{1,5}")


def quote(value: bytes) -> bytes:
    """A Forwarded value: the bare token when it is one, else a quoted string (RFC 7239 §4)."""
    if _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def node(ip: str) -> bytes:
    """The ``for=`` node of an address (RFC 7239 §6): IPv6 bracketed (and so quoted),
    ``unknown`` when it is not an IP address (§6.2)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return b"unknown"
    if addr.version == 6:
        return f'"[{addr.compressed}]"'.encode("ascii")
    return addr.compressed.encode("ascii")


def forwarded_element(fwd: Forwarding, authority: bytes) -> bytes:
    """This hop's element: ``for=…;proto=…`` and ``;host=…`` when there is an authority."""
    out = b"for=" + node(fwd.client_ip) + b";proto=" + fwd.scheme
    if authority:
        out += b";host=" + quote(authority)
    return out


def _unquote(value: bytes) -> bytes | None:
    """A pair's value as its content (token as is, quoted string unescaped); None: bad."""
    if value[:1] == b'"':
        m = _QUOTED.fullmatch(value)
        if m is None:
            return None
        return re.sub(rb"\\(.)", rb"\1", m.group(1))
    return value if _TOKEN.fullmatch(value) else None


def _valid_node(value: bytes) -> bool:
    """RFC 7239 §6: nodename [":" node-port]; nodename an IPv4, a bracketed IPv6,
    ``unknown`` or ``_obfuscated``; node-port a port or ``_obfuscated``."""
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0:
            return False
        try:
            ipaddress.IPv6Address(value[1:end].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return False
        rest = value[end + 1 :]
        if not rest:
            return True
        if rest[:1] != b":":
            return False
        port = rest[1:]
    else:
        name, sep, port = value.partition(b":")
        if name.lower() != b"unknown" and not _OBF.fullmatch(name):
            try:
                ipaddress.IPv4Address(name.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                return False
        if not sep:
            return True
    return bool(_PORT.fullmatch(port) and int(port) <= 65535) or bool(_OBF.fullmatch(port))


def _split(value: bytes, sep: int) -> list[bytes] | None:
    """Split on ``sep`` outside quoted strings; None when a quote is left open."""
    parts: list[bytes] = []
    start = 0
    quoted = escaped = False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                quoted = False
        elif c == 0x22:
            quoted = True
        elif c == sep:
            parts.append(value[start:i])
            start = i + 1
    if quoted:
        return None
    parts.append(value[start:])
    return parts


def parse_forwarded(value: bytes) -> list[list[tuple[str, bytes]]] | None:
    """Parse one ``Forwarded`` field value (RFC 7239 §4) into its elements, each a list of
    ``(lower-case parameter, unquoted value)``; None when it does not follow the grammar (or
    a ``for``/``by`` node does not follow §6, or a parameter repeats within an element).
    Empty list elements (``a, , b``) are allowed, as in every HTTP list (RFC 9110 §5.6.1)."""
    elements: list[list[tuple[str, bytes]]] = []
    items = _split(value, 0x2C)
    if items is None:
        return None
    for item in items:
        item = item.strip(b" \t")
        if not item:
            continue
        pairs = _split(item, 0x3B)
        assert pairs is not None  # (quotes balanced in the whole value, so in each item)
        element: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for pair in pairs:
            pair = pair.strip(b" \t")
            if not pair:
                continue
            name, eq, raw = pair.partition(b"=")
            if not eq or not _TOKEN.fullmatch(name):
                return None
            content = _unquote(raw)
            key = name.decode("ascii").lower()
            if content is None or key in seen:
                return None
            if key in ("for", "by") and not _valid_node(content):
                return None
            seen.add(key)
            element.append((key, content))
        if not element:
            return None
        elements.append(element)
    return elements


# The incoming fields a mode extends (from a trusted peer); the others pass on unchanged.
EXTENDED: dict[str, frozenset[bytes]] = {
    "x-forwarded": frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}),
    "rfc7239": frozenset({b"forwarded"}),
    "both": frozenset(
        {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
    ),
}


def forwarding_fields(
    fwd: Forwarding,
    authority: bytes,
    xff: list[bytes],
    xfp: bytes | None,
    xfh: bytes | None,
    forwarded: list[bytes],
) -> list[Header]:
    """The forwarding fields this hop appends, in the listener's mode.  ``xff``/``xfp``/
    ``xfh`` and ``forwarded`` are the incoming fields the mode extends, as a *trusted* peer
    sent them (empty/None from an untrusted one)."""
    out: list[Header] = []
    mode = fwd.mode
    if mode != "rfc7239":
        xff.append(fwd.client_ip.encode("ascii"))
        out.append((b"x-forwarded-for", b", ".join(xff)))
        out.append((b"x-forwarded-proto", xfp or fwd.scheme))
        if xfh or authority:
            out.append((b"x-forwarded-host", xfh or authority))
    if mode != "x-forwarded":
        chain = [v.strip(b" \t") for v in forwarded if parse_forwarded(v)]
        chain.append(forwarded_element(fwd, authority))
        out.append((b"forwarded", b", ".join(chain)))
    return out
