"""A strict, independent reading of RFC 9112 requests: the yardstick for "unambiguous".

muxproxy may refuse anything (limits, policy); what it must never do is forward a request that
this parser reads differently, or reads as invalid.  So this parser is written from the RFC
grammar, shares no code with muxproxy, and refuses every byte sequence that RFC 9110/9112 do
not allow in a request, with three deliberate leniencies, each unable to move a message
boundary or change a field:

* the request target may hold any VCHAR but "#" (RFC 3986 forbids ``{}|\\^"<>`` and backquote
  too, but they cannot be mistaken for a delimiter, and real clients send them);
* a chunk-size may be followed by whitespace before its CRLF (h11 and nginx accept it);
* any number of empty lines may precede a request-line (RFC 9112 §2.2 says "at least one").

Limits and policies (sizes, "_" in names, CONNECT) are not this parser's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
TOKEN = TCHAR + rb"+"
VCHAR_OBS = rb"[\x21-\x7e\x80-\xff]"
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
# field-line = field-name ":" OWS field-value OWS; field-value = *field-content, which starts
# and ends with a visible character (RFC 9110 §5.5); no CTL but HTAB anywhere.
FIELD_LINE = re.compile(
    rb"(" + TOKEN + rb"):[ \t]*(" + VCHAR_OBS + rb"(?:[ \t]*" + VCHAR_OBS + rb")*)?[ \t]*"
)
# RFC 3986 §3.2.2, §3.2.3: IP-literal / IPv4address / reg-name, then an optional port.
HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
ABSOLUTE = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?#@]*)([^#]*)")
QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*"
    + TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + TOKEN
    + rb"|"
    + QUOTED
    + rb"))?)*[ \t]*"
)


class Invalid(Exception):
    """The bytes are not a valid request (at the point where reading stopped)."""


@dataclass
class Request:
    method: bytes
    target: bytes  # origin-form, "*", or the path and query of an absolute-form target
    authority: bytes
    version: bytes  # b"1.0" | b"1.1"
    headers: list[tuple[bytes, bytes]]  # lower-case names, values without OWS, in order
    body: bytes = b""  # decoded body, so far
    complete: bool = False  # the whole message was read and valid


@dataclass
class Reading:
    requests: list[Request] = field(default_factory=list)
    stop: str = "end"  # "end": all bytes used; "incomplete"; or why the next bytes are invalid


def parse(data: bytes) -> Reading:
    """Read ``data`` as a sequence of pipelined requests, as far as it goes."""
    out = Reading()
    pos = 0
    while True:
        while data.startswith(b"\r\n", pos):
            pos += 2
        if pos == len(data):
            out.stop = "end"
            return out
        try:
            pos = _message(data, pos, out)
        except Invalid as exc:
            out.stop = str(exc) or "invalid"
            return out
        if pos < 0:
            out.stop = "incomplete"
            return out


def _message(data: bytes, pos: int, out: Reading) -> int:
    end = data.find(b"\r\n\r\n", pos)
    if end < 0:
        _check_partial(data[pos:])
        return -1
    lines = data[pos:end].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise Invalid("bare CR or LF")
    m = REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise Invalid("request-line")
    method, target, version = m.group(1), m.group(2), b"1." + m.group(3)
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        f = FIELD_LINE.fullmatch(line)
        if f is None:
            raise Invalid("field line")
        headers.append((f.group(1).lower(), f.group(2) or b""))
    req = _head(method, target, version, headers)
    out.requests.append(req)
    body_start = end + 4
    names = [n for n, _ in headers]
    if b"transfer-encoding" in names:
        return _chunked(data, body_start, req)
    if b"content-length" in names:
        n = int(dict(headers)[b"content-length"])
        req.body = data[body_start : body_start + n]
        if len(req.body) < n:
            return -1
        req.complete = True
        return body_start + n
    req.complete = True
    return body_start


def _check_partial(head: bytes) -> None:
    """An incomplete head already holding a bare CR or LF is invalid whatever follows."""
    stripped = head[:-1] if head.endswith(b"\r") else head
    if re.search(rb"\r(?!\n)|(?<!\r)\n", stripped):
        raise Invalid("bare CR or LF")


def _head(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> Request:
    def values(name: bytes) -> list[bytes]:
        return [v for n, v in headers if n == name]

    hosts = values(b"host")
    if len(hosts) > 1 or (version == b"1.1" and not hosts):
        raise Invalid("Host")
    host = hosts[0] if hosts else None
    if host is not None and HOST.fullmatch(host) is None:
        raise Invalid("Host syntax")
    te, cl = values(b"transfer-encoding"), values(b"content-length")
    # RFC 9112 §6.1, §6.3: only a lone, final "chunked" frames a request we can read, and
    # never beside Content-Length or in HTTP/1.0.
    if te and (len(te) != 1 or te[0].lower() != b"chunked" or cl or version == b"1.0"):
        raise Invalid("Transfer-Encoding")
    if cl and (len(cl) != 1 or not re.fullmatch(rb"[0-9]+", cl[0])):
        raise Invalid("Content-Length")
    if b"#" in target:
        raise Invalid("fragment")
    authority = host or b""
    if target.startswith(b"/"):
        pass
    elif target == b"*":
        if method != b"OPTIONS":
            raise Invalid("asterisk-form")
    else:
        m = ABSOLUTE.fullmatch(target)
        if m is None or method == b"CONNECT":
            raise Invalid("target form")
        if HOST.fullmatch(m.group(1)) is None or not m.group(1):
            raise Invalid("authority")
        if host is not None and host.lower() != m.group(1).lower():
            raise Invalid("absolute-form authority differs from Host")
        authority = m.group(1)
        rest = m.group(2)
        target = rest if rest.startswith(b"/") else b"/" + rest
    return Request(method, target, authority, version, headers)


def _chunked(data: bytes, pos: int, req: Request) -> int:
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            req.body = bytes(body)
            return -1
        m = CHUNK_LINE.fullmatch(data, pos, eol)
        if m is None:
            req.body = bytes(body)
            raise Invalid("chunk-size line")
        size = int(m.group(1), 16)
        pos = eol + 2
        if size == 0:
            break
        piece = data[pos : pos + size]
        body += piece
        if len(piece) < size:
            req.body = bytes(body)
            return -1
        pos += size
        crlf = data[pos : pos + 2]
        if crlf != b"\r\n"[: len(crlf)]:
            req.body = bytes(body)
            raise Invalid("chunk data not followed by CRLF")
        if len(crlf) < 2:
            req.body = bytes(body)
            return -1
        pos += 2
    req.body = bytes(body)
    # trailer-section = *( field-line CRLF ), then CRLF
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            _check_partial(data[pos:])
            return -1
        line = data[pos:eol]
        pos = eol + 2
        if not line:
            req.complete = True
            return pos
        if b"\r" in line or b"\n" in line or FIELD_LINE.fullmatch(line) is None:
            raise Invalid("trailer field")
