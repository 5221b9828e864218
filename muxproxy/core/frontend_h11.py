"""One client connection speaking HTTP/1.1, hardened for the edge: heads, bodies, responses.

Theory of operation
-------------------
Heads are parsed by :mod:`~muxproxy.core.request_head`; bodies are framed here (Content-Length)
and by :class:`~.chunked.ChunkedScanner` (chunked); responses are serialised here.  h11 is
not used on this path: it lets through heads and chunk lines a proxy must refuse
(Content-Length with Transfer-Encoding, obs-fold, bare LF, control characters, 20-digit chunk
sizes, ...), and parsing through it was the largest single cost of a proxied request.
``tests/unit/test_head_parser.py`` holds the head parser to never accepting a head h11 would
refuse, and the fuzz invariant holds the whole session to a strict reference parser.

* All received bytes that are not body bytes wait in one buffer, ``_buf``: the head being
  read, and whatever follows a request (pipelined requests, or a tunnel's first bytes).  The
  incomplete head is scanned incrementally (each byte once, so trickling a 64 KiB head one
  byte per read costs O(n), not O(n²)) and refused as soon as it holds a bare CR or LF, a
  control character or a folded line, rather than when the timeout ends it.
* Once a head is read, body bytes go through the framer as they arrive (one framer for every
  request): a Content-Length count, or the chunked scanner, which checks chunk lines and the
  trailer section and hands out chunk data.  Bytes past the body's end go back to ``_buf``.
  A body error in the bytes that came with the head refuses the request before its head is
  forwarded; a body error in one read is raised before any data of that read is handed out.
* Request trailers are never forwarded: fields such as ``content-length`` or ``host`` in
  trailers are a known way to confuse the next hop.  A well-formed trailer section is
  dropped; a malformed one is refused like a malformed head.
* When the exchange is over and keep-alive allows, ``_buf`` already holds the next bytes and
  the next cycle starts, so every head, pipelined or not, passes the same checks.

Requests are answered strictly in order: the next head is not even parsed until the current
response has been sent in full.

Errors are :class:`~muxproxy.errors.ClientError` with the status to answer; after one, the
connection must be closed (``error_response`` says ``connection: close``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from ..errors import REASONS, ClientError
from .chunked import ChunkedScanner
from .headers import Header
from .memo import ByIdentity

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
        "_body_bytes",
        "_body_done",
        "_body_error",
        "_buf",
        "_chunks",
        "_continued",
        "_empty_lines",
        "_ended",
        "_eof",
        "_first_eol",
        "_framing",
        "_in_head",
        "_length",
        "_must_close",
        "_pending",
        "_remaining",
        "_response_done",
        "_scanned",
        "limits",
        "request",
        "response_started",
    )

    def __init__(self, limits: HeadLimits = _DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()  # everything received that is not request body
        self._body_done = True  # no body bytes are expected (none, or all arrived)
        self._length = 0  # Content-Length body bytes still to come
        self._pending: list[bytes] = []  # framed body data not yet handed out
        self._ended = False  # EndOfRequest was returned
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

    # --- input -------------------------------------------------------------------------

    @property
    def head_started(self) -> bool:
        """Some bytes of the next request head have arrived (header_timeout runs from here)."""
        return self._in_head and bool(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means the client closed its side."""
        if not data:
            self._eof = True
        elif self._body_done:
            self._buf.extend(data)
        else:
            self._frame_body(data)

    def _frame_body(self, data: bytes) -> None:
        """Body bytes (and maybe what follows the body) through the one framer."""
        if self._body_error is not None:
            return  # refused already: nothing more is framed
        scanner = self._chunks
        if scanner is None:  # Content-Length
            take = self._length
            if len(data) <= take:
                self._pending.append(data)
                self._length = take - len(data)
                self._body_done = not self._length
                return
            if take:
                self._pending.append(data[:take])
            self._length = 0
            self._body_done = True
            self._buf.extend(data[take:])
            return
        try:
            end = scanner.feed(data, self._pending)
        except ClientError as exc:
            self._body_error = exc  # raised by next_event, before any of this data is handed out
            return
        if end >= 0:
            self._body_done = True
            if end < len(data):
                self._buf.extend(data[end:])

    def next_event(self) -> Event:
        """The next request event, NEED_DATA, or CLOSED.  Raises ClientError."""
        if self._in_head:
            return self._next_head()
        if self._body_error is not None:
            raise self._body_error
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._body_bytes += len(data)
            if self._body_bytes > self.limits.max_body:
                raise ClientError("request body too large", 413)
            return Body(data)
        if self._body_done:
            if self._ended:
                return NEED_DATA
            self._ended = True
            # Request trailers are dropped, as nginx does (see the theory of operation).
            return EndOfRequest([])
        if self._eof:
            raise ClientError("client closed the connection mid-request")
        return NEED_DATA

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
            raw = bytes(buf)
            buf.clear()
        else:
            raw = bytes(buf[: end + 4])
            del buf[: end + 4]
        self._scanned = 0
        self._first_eol = -1
        head = read_head(raw, limits)
        self._in_head = False
        self._body_bytes = 0
        self._ended = False
        self.request = head
        if not head.has_body:
            return head
        self._body_done = False
        if head.content_length is None:
            self._chunks = ChunkedScanner(
                limits.max_body, limits.max_header_bytes, limits.max_headers
            )
        else:
            self._length = head.content_length
            self._body_done = not self._length
        if buf and not self._body_done:  # body bytes that came with the head: frame them now
            rest = bytes(buf)
            buf.clear()
            self._frame_body(rest)
            if self._body_error is not None:
                # The body that came with the head is already known to be bad: refuse the
                # request before anything of it is forwarded.
                raise self._body_error
        return head

    # --- output ---------------------------------------------------------------------
    #
    # Responses are serialised here rather than by h11: the head comes from a backend whose
    # fields headers.response_from_h2 already validated, and h11's per-event validation was
    # measured as the largest single cost of a proxied request.  h11 keeps parsing requests.

    @property
    def request_complete(self) -> bool:
        return not self._in_head and self._body_done

    @property
    def can_keep_alive(self) -> bool:
        """The connection may serve another request after this one (as far as is known)."""
        return not self._must_close and self.request_complete

    def close_after_response(self) -> None:
        """The connection ends after this response, and its head says ``connection: close``
        (a proxy draining, a listener removed): the client knows not to send another."""
        self._must_close = True

    def continue_bytes(self) -> bytes:
        """``100 Continue`` if the client waits for it before sending its body, else b""."""
        req = self.request
        if req is not None and req.expects_continue and not self._continued:
            self._continued = True
            if self._body_bytes == 0 and not self.response_started:
                return b"HTTP/1.1 100 Continue\r\n\r\n"
        return b""

    def response_head(self, status: int, headers: Sequence[Header]) -> bytes:
        """Serialise a final response head and choose its framing (RFC 9112 §6.3)."""
        req = self.request
        assert req is not None and not self.response_started
        known = _FIELD_LINES.get(headers)  # the same memoised head as before (headers.py)
        if known is None:
            known = _field_lines(headers)
            if type(headers) is tuple:
                _FIELD_LINES.put(headers, known)
        block, length = known
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status, block]
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
        data = bytes(self._buf)
        self._buf = bytearray()
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
_STATUS_LINES = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase.encode())
    for code, phrase in ((s.value, s.phrase) for s in HTTPStatus)
}


# The field lines of response heads serialised before, by the identity of the head's tuple
# (headers.response_from_h2 hands out the same tuple for the same decoded block).
_FIELD_LINES: ByIdentity[Sequence[Header], tuple[bytes, int | None]] = ByIdentity(64)


def _field_lines(headers: Sequence[Header]) -> tuple[bytes, int | None]:
    """A response's fields as HTTP/1.1 lines, and its content-length (RFC 9112 §6.3)."""
    length: int | None = None
    for name, value in headers:
        if name == b"content-length":
            if length is not None or not value.isdigit():
                raise ResponseFramingError("bad content-length from the backend")
            length = int(value)
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers]), length
