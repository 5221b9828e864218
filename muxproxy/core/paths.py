"""Normalising a request target's path before it is routed and forwarded (RFC 3986 §6.2.2).

Theory of operation
-------------------
Routes match path prefixes, so the path a route sees must be the path the backend will act
on: ``/public/../admin`` is ``/admin`` to every backend that resolves dot segments, and must not
match a ``/public`` route.  :func:`normalise_target` rewrites the path part of an origin-form
target (the query is left exactly as sent) in the order RFC 3986 §6.2.2 gives:

1. **Percent-encoding** (§6.2.2.2, §6.2.2.1): an escape of an unreserved character
   (``ALPHA / DIGIT / "-" / "." / "_" / "~"``) is decoded; every other escape is kept, its hex
   digits upper-cased.  A ``%`` not followed by two hex digits is a 400.  Escaped slashes
   (``%2F``) and backslashes (``%5C``) follow the listener's ``escaped_slashes``: ``"reject"``
   (the default: a 400, as Envoy's edge guidance advises — backends disagree on whether they
   separate segments), ``"keep"`` (forwarded as ``%2F``/``%5C``, never a separator here) or
   ``"decode"`` (decoded first, so a decoded ``/`` separates segments in steps 2 and 3).
2. **Merging slashes** (listener ``merge_slashes``, default on, as nginx does): ``//`` → ``/``.
3. **Removing dot segments** (§6.2.2.3, the algorithm of §5.2.4): ``.`` and ``..`` segments are
   resolved; a ``..`` above the root is dropped (§5.4.2: ``/../g`` is ``/g``).

The routed path is the forwarded path: the router calls this once and the exchange sends what
it returns.  A target with no ``%``, no ``/.`` and no ``//`` in its path is returned as it is
(one regular-expression scan: the common request pays nothing more).
"""

from __future__ import annotations

import re
from typing import Literal

from ..errors import ClientError

EscapedSlashes = Literal["keep", "reject", "decode"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_SLASHES = (0x2F, 0x5C)  # "/" and "\"
_RUNS = re.compile(rb"//+")
_SPECIAL = re.compile(rb"%|/\.|//")  # what any step below acts on


def normalise_target(
    target: bytes, *, merge_slashes: bool = True, escaped_slashes: EscapedSlashes = "reject"
) -> bytes:
    """The target with its path normalised (module docstring); raises ClientError (400)."""
    special = _SPECIAL.search(target)
    if special is None:
        return target
    q = target.find(b"?")
    if 0 <= q < special.start():
        return target  # only the query has them: it is left as sent
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    if b"%" in path:
        path = _percent(path, escaped_slashes)
    if merge_slashes and b"//" in path:
        path = _RUNS.sub(b"/", path)
    if b"/." in path:
        path = remove_dot_segments(path)
    return path + query


def _percent(path: bytes, escaped_slashes: EscapedSlashes) -> bytes:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            raise ClientError("malformed percent-encoding in the path")
        byte = int(part[:2], 16)
        if byte in _UNRESERVED:
            out.append(bytes((byte,)))
        elif byte in _SLASHES and escaped_slashes != "keep":
            if escaped_slashes == "reject":
                raise ClientError("escaped slash in the path")
            out.append(bytes((byte,)))
        else:
            out.append(b"%" + part[:2].upper())
        out.append(part[2:])
    return b"".join(out)


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path (one that starts with ``/``)."""
    segments = path.split(b"/")
    out: list[bytes] = []
    for seg in segments[1:]:
        if seg == b"..":
            if out:
                out.pop()
        elif seg != b".":
            out.append(seg)
    if segments[-1] in (b".", b".."):
        out.append(b"")  # "/a/b/.." is "/a/": the directory stays a directory
    return b"/" + b"/".join(out)
