"""HTTP/1.1 request heads (RFC 9112 §2–§3, §5): the checks on the raw bytes an edge proxy
needs beyond h11's, and the parser that turns a checked head into a :class:`RequestHead`.

Pure functions: bytes in, a head or a :class:`~muxproxy.errors.ClientError` out.  The session
in :mod:`~muxproxy.core.frontend_h11` calls them once the blank line ending a head is found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..errors import ClientError
from .headers import FORWARDING, HOP_BY_HOP, Header

# What to do with a field name containing "_" (RFC-valid, but CGI-style backends map "_" and
# "-" to the same variable, so "X_Forwarded_For" can pose as "X-Forwarded-For"):
# reject the request (the default, as Envoy's edge guidance advises), drop the field (nginx's
# default), or forward it.
UnderscorePolicy = Literal["reject", "drop", "allow"]


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_uri_bytes: int = 8 * 1024
    max_body: int = 1024**3
    underscore_headers: UnderscorePolicy = "reject"


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form path (absolute-form already reduced), or b"*"
    authority: bytes  # from Host (or the absolute-form target)
    headers: list[Header]  # lower-case names, in order, as received
    http_version: bytes
    has_body: bool
    content_length: int | None  # None: chunked (or no body)
    keep_alive: bool  # the client allows the connection to stay open after this exchange
    expects_continue: bool  # Expect: 100-continue on HTTP/1.1


# Control characters anywhere in a head except CR and LF (checked as pairs) and HTAB.
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"  # RFC 9110 §5.6.2
_REQUEST_LINE = re.compile(rb"^(" + _TOKEN + rb") (\S+) HTTP/(\d)\.(\d)$")
_ABSOLUTE = re.compile(rb"^[hH][tT][tT][pP][sS]?://([^/?#@\s]+)([^#\s]*)$")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:([^\r]*)", re.IGNORECASE)
# RFC 9110 §7.2 / RFC 3986 §3.2.2: uri-host [ ":" port ]; reg-name or an IP literal.  No
# userinfo, no path, no whitespace: the value becomes :authority and is what routes match.
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]")
_FIELD_NAME = re.compile(_TOKEN)
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(?::[0-9]{0,5})?"
)
# Field names that an underscore variant must never stand in for, even when "allow"ed.
_ALIASED = HOP_BY_HOP | FORWARDING | {b"content-length", b"via", b"trailer"}

# The common case in one pass: an origin-form request line and field lines of a token, a colon
# and visible characters, spaces, tabs or obs-text (no CTL, no bare CR or LF, no folding).
_COMMON_HEAD = re.compile(
    rb"(" + _TOKEN + rb") (/[\x21\x22\x24-\x7e]*) HTTP/1\.([01])\r\n"  # no '#' in the target
    rb"((?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
)
_GOOD_HOSTS: set[bytes] = set()  # Host values that passed _HOST (bounded)
# Fields the common case leaves to the full parser (it has the exact rules and messages).
_UNCOMMON = frozenset({b"transfer-encoding", b"upgrade", b"expect"})


def read_head(raw: bytes, limits: HeadLimits) -> RequestHead:
    """:func:`check_raw_head` then :func:`parse_head`, with a fast path for common heads.

    The fast path answers only heads it fully understands and otherwise defers to the two
    functions, so every refusal (and its reason) comes from one place; a property test holds
    both paths to the same result."""
    head = common_head(raw, limits)
    if head is None:
        check_raw_head(raw, limits)
        head = parse_head(raw, limits)
    return head


def common_head(raw: bytes, limits: HeadLimits) -> RequestHead | None:
    """The head of a plain request in one pass, or None: not plain, let the full path decide."""
    if len(raw) > limits.max_header_bytes:
        return None
    m = _COMMON_HEAD.fullmatch(raw)
    if m is None:
        return None
    method, target, minor, block = m.groups()
    if len(target) > limits.max_uri_bytes or method == b"CONNECT":
        return None
    headers: list[Header] = []
    host: bytes | None = None
    content_length: int | None = None
    connection = b""
    if block:
        lines = block[:-2].split(b"\r\n")
        if len(lines) > limits.max_headers:
            return None
        append = headers.append
        for line in lines:
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"host":
                if host is not None:
                    return None
                host = value
            elif name == b"content-length":
                if content_length is not None or not value.isdigit() or len(value) > 20:
                    return None
                content_length = int(value)
            elif name == b"connection":
                connection += b"," + value.lower()
            elif name in _UNCOMMON or b"_" in name:
                return None
            append((name, value))
    http_version = b"1.1" if minor == b"1" else b"1.0"
    if host is None:
        if http_version == b"1.1":
            return None
    elif host not in _GOOD_HOSTS:  # (clients name the same few hosts again and again)
        if _HOST.fullmatch(host) is None:
            return None
        if len(_GOOD_HOSTS) >= 1024:
            _GOOD_HOSTS.clear()
        _GOOD_HOSTS.add(host)
    if content_length is not None and content_length > limits.max_body:
        return None
    keep_alive = http_version == b"1.1" and (
        not connection or b"close" not in {t.strip() for t in connection.split(b",")}
    )
    return RequestHead(
        method,
        target,
        host or b"",
        headers,
        http_version,
        bool(content_length),
        content_length,
        keep_alive,
        False,
    )


def check_raw_head(raw: bytes, limits: HeadLimits) -> None:
    """Refuse what h11 would accept but a proxy must not (RFC 9112 §2.2, §5, §6).

    ``raw`` is one complete head ending in CRLF CRLF.  Raises ClientError.
    """
    if len(raw) > limits.max_header_bytes:
        raise ClientError("request head too large", 431)
    lines = raw.count(b"\r\n")
    if raw.count(b"\n") != lines or raw.count(b"\r") != lines:
        raise ClientError("bare CR or LF in request head")
    if b"\r\n " in raw or b"\r\n\t" in raw:
        raise ClientError("obsolete line folding in request head")
    if _CTL.search(raw) is not None:
        raise ClientError("control character in request head")
    line_end = raw.index(b"\r\n")
    m = _REQUEST_LINE.match(raw[:line_end])
    if m is None:
        raise ClientError("malformed request line")
    major, minor = m.group(3), m.group(4)
    if major != b"1" or minor not in (b"0", b"1"):
        raise ClientError("only HTTP/1.0 and HTTP/1.1 are served here", 505)
    if len(m.group(2)) > limits.max_uri_bytes:
        raise ClientError("request target too long", 414)
    if lines - 2 > limits.max_headers:
        raise ClientError("too many header fields", 431)
    lengths = _CONTENT_LENGTH.findall(raw)
    if len(lengths) > 1 or (lengths and b"," in lengths[0]):
        # h11 merges identical copies; a proxy must not guess (RFC 9112 §6.3, smuggling).
        raise ClientError("duplicate Content-Length")


def parse_head(raw: bytes, limits: HeadLimits) -> RequestHead:
    """Parse a complete head that passed :func:`check_raw_head` (RFC 9112 §2–§3, §5).

    Refuses, as h11 does, a field line that is not ``token ":" OWS value OWS`` (whitespace
    before the colon included), a target with anything but VCHAR, and an HTTP/1.1 request
    without exactly one Host; then makes the checks h11 does not (see :func:`_request_head`).
    """
    lines = raw[:-4].split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    if _BAD_TARGET.search(target) is not None:
        raise ClientError("illegal characters in request target")
    headers: list[Header] = []
    append = headers.append
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _FIELD_NAME.fullmatch(name) is None:
            raise ClientError(f"illegal header line: {line[:40]!r}")
        value = value.strip(b" \t")
        if b"\x00" in value:  # (check_raw_head refused every other control character)
            raise ClientError(f"illegal header line: {line[:40]!r}")
        name = name.lower()
        if name == b"transfer-encoding":
            value = value.lower()  # codings are case-insensitive; h11 lower-cases it too
        append((name, value))
    return _request_head(method, target, version[5:], headers, limits)


def _request_head(
    method: bytes, target: bytes, http_version: bytes, headers: list[Header], limits: HeadLimits
) -> RequestHead:
    """Checks on the parsed head beyond the grammar; builds our RequestHead."""
    cl: list[bytes] = []
    te: list[bytes] = []
    host: bytes | None = None
    connection = b""
    expect = b""
    upgrade = False
    underscored = False
    for name, value in headers:
        if name == b"connection":
            connection += b"," + value.lower()
        elif name == b"expect":
            expect = value.lower()
        elif name == b"content-length":
            if cl or not value.isdigit() or len(value) > 20:
                raise ClientError("duplicate or malformed Content-Length")
            cl.append(value)
        elif name == b"transfer-encoding":
            # In field order, as h11 does: a second field, or any coding but chunked, is 501.
            if te or value.lower() != b"chunked":
                raise ClientError("unsupported Transfer-Encoding", 501)
            te.append(value)
        elif name == b"upgrade":
            upgrade = upgrade or bool(value.strip(b", \t"))
        elif name == b"host":
            if host is not None:
                raise ClientError("more than one Host")
            host = value
        elif b"_" in name:
            policy = limits.underscore_headers
            if policy == "reject":
                raise ClientError("underscore in header field name")
            if policy == "allow" and name.replace(b"_", b"-") in _ALIASED:
                raise ClientError("header field name aliases a framing or forwarding field")
            underscored = True
    if underscored and limits.underscore_headers == "drop":
        headers = [(n, v) for n, v in headers if b"_" not in n]
    if host is None and http_version == b"1.1":
        raise ClientError("missing Host")
    if host is not None and _HOST.fullmatch(host) is None:
        raise ClientError("invalid Host")
    if te:
        if cl:
            raise ClientError("both Content-Length and Transfer-Encoding")
        if http_version == b"1.0":
            raise ClientError("Transfer-Encoding on an HTTP/1.0 request")
    content_length = int(cl[0]) if cl else None
    if content_length is not None and content_length > limits.max_body:
        raise ClientError("request body too large", 413)

    if method == b"CONNECT":
        raise ClientError("CONNECT is not served here", 501)
    if b"#" in target:
        raise ClientError("fragment in request target")
    if target[:1] == b"/":
        pass
    elif target == b"*":
        if method != b"OPTIONS":
            raise ClientError("'*' target is only for OPTIONS")
    else:
        m = _ABSOLUTE.match(target)
        if m is None or _HOST.fullmatch(m.group(1)) is None:
            raise ClientError("malformed request target")
        if host is not None and m.group(1).lower() != host.lower():
            raise ClientError("absolute-form target does not match Host")
        host = m.group(1)
        target = m.group(2) or b"/"
        if target[:1] != b"/":
            target = b"/" + target
    tokens = {t.strip() for t in connection.split(b",")}
    # HTTP/1.0 connections are closed after one exchange, and so is one that asked for an
    # Upgrade: a client may follow it with bytes of the new protocol, never to be read as HTTP.
    keep_alive = http_version == b"1.1" and b"close" not in tokens and not upgrade
    return RequestHead(
        method=method,
        target=target,
        authority=host or b"",
        headers=headers,
        http_version=http_version,
        has_body=bool(te) or bool(content_length),
        content_length=content_length,
        keep_alive=keep_alive,
        expects_continue=http_version == b"1.1" and expect == b"100-continue",
    )
