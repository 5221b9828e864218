"""The framer of chunked request bodies (RFC 9112 §7.1): strict, incremental, sans-IO.

Theory of operation
-------------------
:class:`ChunkedScanner` sees every raw body byte once, as it arrives, and both checks and
frames it: chunk data is handed out as slices of the input (never copied twice), chunk lines
and the trailer section are checked and dropped, and ``feed`` says where the body ended, so
the bytes after it (the next request's head) go back to the session's head buffer.

It refuses what lenient parsers (h11 among them) accept but an edge proxy must not: chunk
sizes over 16 hex digits, any bytes after ``;`` that are not an extension (bare CR, control
characters, kilobytes of "extension"), chunk data not followed by CRLF, and trailer fields
with bare LF, obs-fold or control characters.  Its grammar is strictly narrower than h11's
(every chunk line it accepts, h11 accepts and reads the same size from; trailer lines must end
in CRLF), so wherever it accepts, it reads the body exactly as h11 and the strict reference
parser of the tests would.  The declared sizes count against ``max_body`` before their data
arrives.  Errors are raised at the first bad byte, before any data of that input is handed
out.
"""

from __future__ import annotations

import re

from ..errors import ClientError

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
# chunk-size [ chunk-ext ] CRLF, chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
# At most 16 hex digits (2^64 - 1): a longer size is refused, not reduced, since parsers that
# truncate or wrap it are a known smuggling vector.  Trailing whitespace before the CRLF is
# tolerated (h11 and nginx accept it too, and it cannot move a boundary); space before the
# first ";" is not, because h11 refuses it: this grammar stays inside h11's.
_EXT = rb"%s(?:[ \t]*=[ \t]*(?:%s|%s))?" % (_TOKEN, _TOKEN, _QUOTED)
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;[ \t]*%s(?:[ \t]*;[ \t]*%s)*)?[ \t]*\r\n" % (_EXT, _EXT)
)
# A trailer field: token ":" then no control character but HTAB; never a folded line.
_TRAILER_LINE = re.compile(rb"%s:[\t\x20-\x7e\x80-\xff]*\r\n" % _TOKEN)
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions; nothing legitimate comes close
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedScanner:
    """Frames and checks the raw bytes of one chunked request body; ``feed`` raises
    ClientError.

    ``max_body`` bounds the sum of the declared chunk sizes (413 before the data arrives);
    ``max_trailer_bytes`` and ``max_trailers`` bound the trailer section (431).
    """

    __slots__ = (
        "_declared",
        "_line",
        "_remaining",
        "_state",
        "_trailer_bytes",
        "_trailers",
        "max_body",
        "max_trailer_bytes",
        "max_trailers",
    )

    def __init__(self, max_body: int, max_trailer_bytes: int, max_trailers: int) -> None:
        self.max_body = max_body
        self.max_trailer_bytes = max_trailer_bytes
        self.max_trailers = max_trailers
        self._state = _SIZE
        self._line = bytearray()  # a chunk line or trailer line, until its LF arrives
        self._remaining = 0  # chunk data still to skip
        self._declared = 0
        self._trailer_bytes = 0
        self._trailers = 0

    @property
    def done(self) -> bool:
        """The last chunk and the trailer section have been read."""
        return self._state == _DONE

    def feed(self, data: bytes, out: list[bytes]) -> int:
        """Frame ``data``: append its chunk data to ``out``.  Returns -1 while the body goes on,
        else the offset in ``data`` just past the body's end.  Raises ClientError (and then
        has appended nothing of ``data``)."""
        i, n = 0, len(data)
        mark = len(out)
        try:
            return self._feed(data, i, n, out)
        except ClientError:
            del out[mark:]
            raise

    def _feed(self, data: bytes, i: int, n: int, out: list[bytes]) -> int:
        while i < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - i)
                out.append(data[i : i + take] if take != n else data)
                i += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                take = min(2 - len(self._line), n - i)
                self._line += data[i : i + take]
                i += take
                if self._line != b"\r\n"[: len(self._line)]:
                    raise ClientError("chunk data not followed by CRLF")
                if len(self._line) == 2:
                    self._line.clear()
                    self._state = _SIZE
            elif state == _DONE:
                return i
            else:
                j = data.find(b"\n", i)
                if j < 0:
                    self._line += data[i:]
                    self._check_partial_line()
                    return -1
                self._line += data[i : j + 1]
                i = j + 1
                line = bytes(self._line)
                self._line.clear()
                if state == _SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
        return i if self._state == _DONE else -1

    def _check_partial_line(self) -> None:
        if self._state == _SIZE:
            if len(self._line) > MAX_CHUNK_LINE:
                raise ClientError("chunk-size line too long")
        elif self._trailer_bytes + len(self._line) > self.max_trailer_bytes:
            raise ClientError("request trailers too large", 431)

    def _size_line(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            raise ClientError("chunk-size line too long")
        m = _CHUNK_LINE.fullmatch(line)
        if m is None:
            digits = len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))
            if digits > 16:
                raise ClientError("chunk size longer than 16 hex digits")
            raise ClientError("malformed chunk-size line")
        size = int(m.group(1), 16)
        self._declared += size
        if self._declared > self.max_body:
            raise ClientError("request body too large", 413)
        if size:
            self._remaining = size
            self._state = _DATA
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if line == b"\r\n":
            self._state = _DONE
            return
        self._trailer_bytes += len(line)
        self._trailers += 1
        if self._trailer_bytes > self.max_trailer_bytes or self._trailers > self.max_trailers:
            raise ClientError("request trailers too large", 431)
        if _TRAILER_LINE.fullmatch(line) is None:
            raise ClientError("malformed request trailer field")
