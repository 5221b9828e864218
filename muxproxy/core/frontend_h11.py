"""One client connection speaking HTTP/1.1, hardened for the edge; h11 frames request bodies.

Theory of operation
-------------------
Heads are parsed by :mod:`~muxproxy.core.request_head`, bodies are framed by h11.  h11 ≥ 0.16
lets through heads a proxy must refuse (Content-Length with Transfer-Encoding, obs-fold, bare
LF, control characters in values, a whole head over the limit when it comes in one read, ...),
and parsing a head through h11 was the largest single cost of a proxied request, so every head
is checked raw and parsed there; ``tests/unit/test_head_parser.py`` holds the parser to never
accepting a head h11 would refuse.  A request without a body never meets h11 at all:

* While a head is expected, received bytes wait in ``_buf``; nothing reaches h11 until the
  blank line ending the head is found and the raw head has passed :func:`check_raw_head`.
  The incomplete head is scanned incrementally (each byte once, so trickling a 64 KiB head one
  byte per read costs O(n), not O(n²)) and refused as soon as it holds a bare CR or LF, a
  control character or a folded line, rather than when the timeout ends it.
* A request with a body then has its head, and everything after it, fed to h11, which frames
  the body.  A chunked body's raw bytes also pass through :class:`~.chunked.ChunkedScanner`,
  which refuses what h11 would accept but must not be (chunk-size lines over 16 hex digits,
  bare CR in a chunk extension, a malformed trailer section) before h11 parses them.  A body
  error in the bytes that came with the head refuses the request before its head is forwarded.
* Request trailers are never forwarded: h11 unfolds and accepts trailer bytes that a head
  would be refused for, and fields such as ``content-length`` or ``host`` in trailers are a
  known way to confuse the next hop.  A well-formed trailer section is dropped; a malformed
  one is refused like a malformed head.
* When the exchange is over and keep-alive allows, the bytes beyond the request (pipelined
  requests: h11's ``trailing_data``, or ``_after`` for a body-less request) move back into
  ``_buf`` and the next cycle starts, so every head, pipelined or not, passes the same checks.

Requests are answered strictly in order: the next head is not even parsed until the current
response has been sent in full.

Errors are :class:`~muxproxy.errors.ClientError` with the status to answer; after one, the
connection must be closed (``error_response`` says ``connection: close``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

import h11

from ..errors import REASONS, ClientError
from .chunked import ChunkedScanner
from .headers import Header

# Re-exported: the session's callers and tests name them from here.
from .request_head import HeadLimits as HeadLimits
from .request_head import RequestHead as RequestHead
from .request_head import check_raw_head as check_raw_head
from .request_head import parse_head as parse_head
from .request_head import read_head


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel("NEED_DATA")
CLOSED: Final = _Sentinel("CLOSED")  # the client closed cleanly between requests


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class EndOfRequest:
    trailers: list[Header]


Event = RequestHead | Body | EndOfRequest | _Sentinel

# What refuses an incomplete head early: a bare CR or LF, a folded line, a control character.
# (A CR as the very last byte is left for the next read: its LF may follow.)
_EARLY = re.compile(rb"\r(?!\n)|(?<!\r)\n|\n[ \t]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# RFC 9112 §2.2 asks to ignore "at least one" empty line before a request-line; a client that
# sends more is trickling CRLFs to keep an idle connection (each would restart idle_timeout).
MAX_EMPTY_LINES = 2


def error_bytes(status: int, reason: str, *, head_only: bool = False) -> bytes:
    """A complete ``connection: close`` error response with a short plain-text reason."""
    body = reason.encode("utf-8", "replace") + b"\n"
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


_DEFAULT_LIMITS = HeadLimits()


class ClientSession:
    """Sans-IO server side of one HTTP/1.1 client connection."""

    __slots__ = (
        "_after",
        "_body_bytes",
        "_body_error",
        "_buf",
        "_chunks",
        "_continued",
        "_empty_lines",
        "_ended",
        "_eof",
        "_first_eol",
        "_framing",
        "_h11",
        "_in_head",
        "_must_close",
        "_remaining",
        "_response_done",
        "_scanned",
        "limits",
        "request",
        "response_started",
    )

    def __init__(self, limits: HeadLimits = _DEFAULT_LIMITS) -> None:
        self.limits = limits
        # h11 frames request bodies only: a request without one (most of them) never meets
        # it, and its bytes after the head wait in ``_after`` for the next cycle.
        self._h11: h11.Connection | None = None
        self._after = bytearray()  # bytes after a body-less request (pipelined, or a tunnel's)
        self._ended = False  # EndOfRequest was returned for the body-less request
        self._buf = bytearray()
        self._eof = False
        self._in_head = True
        self._body_bytes = 0
        self.request: RequestHead | None = None
        self.response_started = False
        self._response_done = False
        self._continued = False
        self._must_close = False
        self._framing = _NONE
        self._remaining = 0
        self._scanned = 0  # bytes of the incomplete head in _buf already looked at
        self._first_eol = -1  # where the request line ends, once seen
        self._empty_lines = 0
        self._chunks: ChunkedScanner | None = None
        self._body_error: ClientError | None = None

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)

    # --- input -------------------------------------------------------------------------

    @property
    def head_started(self) -> bool:
        """Some bytes of the next request head have arrived (header_timeout runs from here)."""
        return self._in_head and bool(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means the client closed its side."""
        if self._in_head or self._h11 is None:
            if data:
                (self._buf if self._in_head else self._after).extend(data)
            else:
                self._eof = True
        else:
            self._feed_body(data)
            self._h11.receive_data(data)

    def _feed_body(self, data: bytes) -> None:
        scanner = self._chunks
        if scanner is not None and data and self._body_error is None:
            try:
                scanner.feed(data)
            except ClientError as exc:
                self._body_error = exc  # raised by next_event, before h11 parses those bytes

    def next_event(self) -> Event:
        """The next request event, NEED_DATA, or CLOSED.  Raises ClientError."""
        if self._in_head:
            return self._next_head()
        if self._h11 is None:
            if self._ended:
                return NEED_DATA
            self._ended = True
            return EndOfRequest([])
        if self._body_error is not None:
            raise self._body_error
        try:
            ev = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ClientError(f"malformed request body: {exc}", exc.error_status_hint) from None
        if type(ev) is h11.Data:
            self._body_bytes += len(ev.data)
            if self._body_bytes > self.limits.max_body:
                raise ClientError("request body too large", 413)
            return Body(ev.data)
        if type(ev) is h11.EndOfMessage:
            # Request trailers are dropped, as nginx does (see the theory of operation).
            return EndOfRequest([])
        if ev is h11.NEED_DATA or ev is h11.PAUSED:
            return NEED_DATA
        if type(ev) is h11.ConnectionClosed:
            raise ClientError("client closed the connection mid-request")
        raise ClientError(f"unexpected {type(ev).__name__}")  # pragma: no cover

    def _next_head(self) -> Event:
        buf = self._buf
        if not buf:  # (asked once per request before anything arrived)
            return CLOSED if self._eof else NEED_DATA
        limits = self.limits
        scanned = self._scanned
        if not scanned:
            while buf.startswith(b"\r\n"):  # RFC 9112 §2.2: ignore at least one empty line
                del buf[:2]
                self._empty_lines += 1
                if self._empty_lines > MAX_EMPTY_LINES:
                    raise ClientError("too many empty lines before the request line")
        # Resume where the previous read stopped: a trickled head costs O(n), not O(n²).
        end = buf.find(b"\r\n\r\n", max(0, scanned - 3))
        if end < 0:
            if len(buf) > limits.max_header_bytes:
                raise ClientError("request head too large", 431)
            stop = len(buf) - 1 if buf[-1:] == b"\r" else len(buf)
            if _EARLY.search(buf, max(0, scanned - 1), stop) is not None:
                raise ClientError("bare CR or LF, folded line or control character in head")
            if self._first_eol < 0:
                self._first_eol = buf.find(b"\r\n", max(0, scanned - 1))
            self._scanned = stop
            first_eol = self._first_eol
            if (first_eol < 0 and len(buf) > limits.max_uri_bytes + 64) or (
                first_eol > limits.max_uri_bytes + 64
            ):
                raise ClientError("request target too long", 414)
            if self._eof:
                if buf:
                    raise ClientError("client closed the connection mid-head")
                return CLOSED
            return NEED_DATA
        if end + 4 == len(buf):  # the usual case: one whole head, nothing after it
            raw, rest = bytes(buf), b""
        else:
            raw, rest = bytes(buf[: end + 4]), bytes(buf[end + 4 :])
        buf.clear()
        self._scanned = 0
        self._first_eol = -1
        head = read_head(raw, limits)
        self._in_head = False
        self._body_bytes = 0
        self.request = head
        if not head.has_body:
            self._after = bytearray(rest)
            return head
        # h11 frames the body: it parses the same head again (agreeing with parse_head,
        # which refuses a superset of what h11 does) and then the bytes after it.
        self._h11 = conn = self._new_h11()
        conn.receive_data(raw)
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError as exc:  # pragma: no cover - parse_head refused it
            raise ClientError(f"malformed request: {exc}", exc.error_status_hint) from None
        if type(ev) is not h11.Request:  # pragma: no cover - a full head always parses
            raise ClientError("malformed request")
        if head.content_length is None:
            self._chunks = ChunkedScanner(
                limits.max_body, limits.max_header_bytes, limits.max_headers
            )
        if rest:
            self._feed_body(rest)
            if self._body_error is not None:
                # The body that came with the head is already known to be bad: refuse the
                # request before anything of it is forwarded.
                raise self._body_error
            conn.receive_data(rest)
        if self._eof:
            conn.receive_data(b"")
        return head

    # --- output ---------------------------------------------------------------------
    #
    # Responses are serialised here rather than by h11: the head comes from a backend whose
    # fields headers.response_from_h2 already validated, and h11's per-event validation was
    # measured as the largest single cost of a proxied request.  h11 keeps parsing requests.

    @property
    def request_complete(self) -> bool:
        if self._in_head:
            return False
        return self._h11 is None or self._h11.their_state in _COMPLETE

    @property
    def can_keep_alive(self) -> bool:
        """The connection may serve another request after this one (as far as is known)."""
        return not self._must_close and self.request_complete

    def continue_bytes(self) -> bytes:
        """``100 Continue`` if the client waits for it before sending its body, else b""."""
        req = self.request
        if req is not None and req.expects_continue and not self._continued:
            self._continued = True
            if self._body_bytes == 0 and not self.response_started:
                return b"HTTP/1.1 100 Continue\r\n\r\n"
        return b""

    def response_head(self, status: int, headers: list[Header]) -> bytes:
        """Serialise a final response head and choose its framing (RFC 9112 §6.3)."""
        req = self.request
        assert req is not None and not self.response_started
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        length: int | None = None
        for name, value in headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    raise ResponseFramingError("bad content-length from the backend")
                length = int(value)
            lines.append(name + b": " + value + b"\r\n")
        self.response_started = True  # (not before: a head refused above can become a 502)
        if status < 200 or status in (204, 304) or req.method == b"HEAD":
            self._framing = _NONE
        elif length is not None:
            self._framing = _LENGTH
            self._remaining = length
        elif req.http_version == b"1.1":
            self._framing = _CHUNKED
            lines.append(b"transfer-encoding: chunked\r\n")
        else:
            self._framing = _CLOSE
            self._must_close = True
        if not req.keep_alive or self._must_close:
            self._must_close = True
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def response_body(self, data: bytes) -> bytes:
        framing = self._framing
        if framing == _LENGTH:
            self._remaining -= len(data)
            if self._remaining < 0:
                raise ResponseFramingError("backend sent more than its content-length")
            return data
        if framing == _CHUNKED:
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if framing == _CLOSE:
            return data
        return b""  # HEAD, 1xx, 204, 304: a body is never relayed

    def response_end(self, trailers: list[Header] | None = None) -> bytes:
        framing = self._framing
        self._response_done = True
        if framing == _CHUNKED:
            return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers or ()) + b"\r\n"
        if framing == _LENGTH and self._remaining:
            raise ResponseFramingError("backend sent less than its content-length")
        return b""

    def detach(self) -> bytes:
        """Hand the connection over to a tunnel: the bytes received after the request."""
        self._must_close = True
        self.request = None  # the tunnel keeps what it needs; an idle one should hold no more
        if self._h11 is None:
            data = bytes(self._after)
            self._after = bytearray()
            return data
        data = bytes(self._h11.trailing_data[0])
        self._h11 = None
        return data

    def error_response(self, status: int, reason: str, extra: tuple[Header, ...] = ()) -> bytes:
        """A proxy-generated error with a short plain-text reason.  Keeps the connection when
        it is safe (whole request read, nothing of the response sent); b"" if too late."""
        if self.response_started:
            return b""
        if self.request is None or not self.request_complete:
            self._must_close = True
        head_only = self.request is not None and self.request.method == b"HEAD"
        body = reason.encode("utf-8", "replace") + b"\n"
        if self.request is None:
            self.response_started = True
            return error_bytes(status, reason, head_only=head_only)
        out = self.response_head(
            status,
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        )
        if not head_only:
            out += self.response_body(body)
        return out + self.response_end()

    def start_next_cycle(self) -> bool:
        """After a response: True when the connection may serve another request."""
        if self._must_close or not self._response_done or not self.request_complete:
            return False
        conn = self._h11
        if conn is None:
            self._buf = self._after
            self._after = bytearray()
            self._ended = False
        else:
            if conn.their_state is not h11.DONE:
                return False
            data, closed = conn.trailing_data
            self._h11 = None
            self._buf = bytearray(data)
            self._eof = self._eof or closed
        self._in_head = True
        self._scanned = 0
        self._first_eol = -1
        self._empty_lines = 0
        self._chunks = None
        self._body_error = None
        self.request = None
        self.response_started = False
        self._response_done = False
        self._continued = False
        return True


class ResponseFramingError(Exception):
    """The backend's response cannot be relayed as HTTP/1.1 (its length does not add up)."""


_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)
_COMPLETE = (h11.DONE, h11.MUST_CLOSE, h11._state.MIGHT_SWITCH_PROTOCOL)
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode())
    for code, phrase in ((s.value, s.phrase) for s in HTTPStatus)
}
