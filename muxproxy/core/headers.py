"""Head translation between HTTP/1.1 and HTTP/2 (RFC 9110 §7.6, RFC 9113 §8.2).

Theory of operation
-------------------
A request head from h11 (lower-cased names, validated values) becomes an HTTP/2 header list:
pseudo-headers first (``:method``, ``:scheme``, ``:authority``, ``:path``), then the regular
fields in their original order, minus every connection-specific field.  Stripping happens
*before* the proxy adds its forwarding fields, so a client naming ``X-Forwarded-For`` in
``Connection`` can only remove its own copy, never ours.

A response head from the backend goes the other way: ``:status`` is checked (three digits, 100–599,
never 101 on a plain request), connection-specific fields are dropped, and every value is
checked for control characters, because HTTP/2 and HTTP/3 forbid only CR, LF and NUL and nothing a
backend sends may inject a line into the HTTP/1.1 response.

Everything here is pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..errors import BackendError
from .forwarded import EXTENDED, forwarding_fields
from .forwarded import Forwarding as Forwarding  # (its home before core/forwarded.py)
from .memo import ByIdentity, Memo

Header = tuple[bytes, bytes]

# RFC 9110 §7.6.1 plus the legacy ones every proxy strips; RFC 9113 §8.2.2 forbids them in h2.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"http2-settings",
        b"host",  # becomes :authority
        b"expect",  # answered by the proxy itself (100-continue)
    }
)
FORWARDING = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
RESPONSE_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
        b"http2-settings",
    }
)

# Anything but HTAB, SP, VCHAR and obs-text is refused in a value we emit (RFC 9110 §5.5).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")


# Response fields already found safe: backends repeat the same few (server, content-type, the
# date of this second), and checking each was a measurable share of a request's CPU.  Shared by
# every backend, so bounded in bytes: a field above SAFE_ITEM_MAX is checked every time.
SAFE_BUDGET = 512 * 1024
SAFE_ITEM_MAX = 2048
_SAFE_MEMO: Memo[Header, bool] = Memo(budget=SAFE_BUDGET, item_max=SAFE_ITEM_MAX, count=4096)
_SAFE = _SAFE_MEMO.data


def memo_bytes() -> int:
    """Bytes held by the process-wide memo of checked response fields."""
    return _SAFE_MEMO.size


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """Names listed in every ``Connection`` field, lower-cased."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    names.add(token)
    return names


def check_value(name: bytes, value: bytes) -> bool:
    """True when a field is safe to emit (valid token name, no control characters)."""
    return bool(_TOKEN.match(name)) and _BAD_VALUE.search(value) is None


def request_to_h2(
    method: bytes,
    path: bytes,
    authority: bytes,
    headers: Sequence[Header],
    fwd: Forwarding,
    http_version: bytes = b"1.1",
    *,
    extra_drop: frozenset[bytes] = frozenset(),
) -> list[Header]:
    """Translate an HTTP/1.1 request head into an HTTP/2 header list.

    ``headers`` are h11's (lower-case names, already validated).  Raises ClientError for a
    value that cannot be forwarded.
    """
    named: set[bytes] | tuple[()] = ()
    for n, _ in headers:  # (a loop, not any(genexpr): a frame fewer per field, per request)
        if n == b"connection":
            named = connection_tokens(headers)
            break
    out: list[Header] = [
        (b":method", method),
        (b":scheme", fwd.scheme),
        (b":authority", authority),
        (b":path", path),
    ]
    if not authority:  # RFC 9113 §8.3.1: no authority to convey, no (empty) :authority
        del out[2]
    xff: list[bytes] = []
    xfp = xfh = None
    forwarded: list[bytes] = []
    vias: list[bytes] = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in named or name in extra_drop:
            if name == b"te" and value.strip().lower() == b"trailers" and b"te" not in named:
                out.append((name, b"trailers"))
            continue
        if name in FORWARDING:  # the rules: core/forwarded.py
            if fwd.trusted:
                if name not in EXTENDED[fwd.mode]:
                    out.append((name, value))  # a kind this listener does not add: as is
                elif name == b"x-forwarded-for":
                    xff.append(value)
                elif name == b"x-forwarded-proto":
                    xfp = value
                elif name == b"x-forwarded-host":
                    xfh = value
                else:
                    forwarded.append(value)
            continue
        if name == b"via":
            vias.append(value)
            continue
        out.append((name, value))
    out += forwarding_fields(fwd, authority, xff, xfp, xfh, forwarded)
    vias.append(http_version + b" " + fwd.via)
    out.append((b"via", b", ".join(vias)))
    return out


def response_from_h2(
    headers: Sequence[Header], *, allow_101: bool = False
) -> tuple[int, Sequence[Header]]:
    """Split an HTTP/2 response head into ``(status, fields)`` fit for HTTP/1.1.

    Raises BackendError (502) for a bad ``:status`` or a value that could inject a line.
    A head that is a memoised decoded block (a tuple) gives the same tuple of fields each
    time, so the client side can memoise its serialisation by identity too.
    """
    hit = _RESPONSES.get(headers)
    if hit is not None:  # (never a 101: the same answer whatever allow_101 says)
        return hit
    status = 0
    out: list[Header] = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status":
                if len(value) != 3 or not value.isdigit():
                    raise BackendError(f"backend sent a malformed :status {value[:16]!r}")
                status = int(value)
            continue
        if name in RESPONSE_DROP:
            continue
        field = (name, value)
        if field not in _SAFE:
            if _BAD_VALUE.search(value) is not None or not _TOKEN.match(name):
                raise BackendError("backend sent a header field that cannot be forwarded")
            _SAFE_MEMO.admit(field, True, len(name) + len(value))
        out.append(field)
    if not 100 <= status <= 599 or (status == 101 and not allow_101):
        raise BackendError(f"backend sent status {status}")
    if type(headers) is tuple and status != 101:
        result = (status, tuple(out))
        _RESPONSES.put(headers, result)
        return result
    return status, out


# Response heads mapped by response_from_h2, by the identity of the decoded block's tuple.
_RESPONSES: ByIdentity[Sequence[Header], tuple[int, Sequence[Header]]] = ByIdentity(64)


def trailers_from_h2(headers: Sequence[Header]) -> list[Header]:
    """Response trailers safe for HTTP/1.1: pseudo and framing fields dropped, values checked."""
    return [
        (n, v)
        for n, v in headers
        if n[:1] != b":"
        and n not in RESPONSE_DROP
        and n not in (b"content-length", b"host")
        and check_value(n, v)
    ]
