"""Route policy as pure functions: matching, rewriting, header rules, splits and rate limits.

Theory of operation.  ``muxproxy/router.py`` compiles each ``[[routes]]`` entry once, at
load (or reload) time, into the objects of this module; per request the proxy calls them
with bytes it already has and the time passed in.  Nothing here reads a clock, does I/O or
keeps state that grows with what clients send, except :class:`RateLimiter`, whose table of
client addresses is an LRU with a hard cap.

* :class:`Matcher` — host (exact / ``*.suffix`` / ``*``), path prefix, exact path, anchored
  regex, methods, header values (exact, or ``~regex``) and query parameters.  Cheap checks
  first; a route without a regex, header or query condition costs one ``startswith`` and one
  host comparison, as before.
* :class:`Rewrite` — ``strip_prefix`` / ``prefix_rewrite`` on the path (the query is kept),
  ``host_rewrite`` on the authority.  The result always starts with ``/``.
* :class:`HeaderRules` — ``set`` / ``add`` / ``remove`` with ``{client_ip}``, ``{request_id}``,
  ``{route}``, ``{host}``, ``{path}``, ``{method}``, ``{scheme}`` substituted; rules may not
  name a field the proxy owns (:data:`OWNED_FIELDS`), which the config check refuses.
* :class:`WeightedChoice` — a cluster per request: smooth weighted round robin (nginx's
  algorithm: exact shares over every ``sum(weights)`` requests), or, when sticky, a stable
  hash (CRC-32, the same in every worker and process) of a header value or the client
  address, so one user stays on one cluster.
* :class:`RateLimiter` — a token bucket per client address; ``allow(key, now)`` answers
  ``0.0`` (go ahead) or the seconds until a token is back (for ``retry-after``).
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from urllib.parse import parse_qsl

from .headers import Header

__all__ = [
    "OWNED_FIELDS",
    "HeaderRules",
    "Matcher",
    "RateLimiter",
    "RequestFacts",
    "Rewrite",
    "WeightedChoice",
    "host_only",
    "render",
]

# Fields no header rule may touch: pseudo-headers are refused by their leading ':' anyway.
OWNED_FIELDS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-length",
    }
)

VARIABLES = ("client_ip", "request_id", "route", "host", "path", "method", "scheme")
_VAR_RE = re.compile(r"\{([a-z_]+)\}")


def host_only(authority: bytes) -> bytes:
    """``Example.com:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``."""
    a = authority.lower()
    if a.startswith(b"["):
        end = a.find(b"]")
        return a[: end + 1] if end > 0 else a
    colon = a.rfind(b":")
    return a[:colon] if colon >= 0 else a


class RequestFacts:
    """What templates may refer to, gathered once per request that needs them."""

    __slots__ = ("client_ip", "host", "method", "path", "request_id", "route", "scheme")

    def __init__(
        self,
        *,
        client_ip: str = "",
        request_id: str = "",
        route: str = "",
        host: bytes = b"",
        path: bytes = b"",
        method: bytes = b"",
        scheme: bytes = b"http",
    ) -> None:
        self.client_ip = client_ip
        self.request_id = request_id
        self.route = route
        self.host = host
        self.path = path
        self.method = method
        self.scheme = scheme

    def value(self, name: str) -> bytes:
        v = getattr(self, name)
        return v if isinstance(v, bytes) else v.encode("latin-1")


def template_variables(template: str) -> list[str]:
    """The ``{names}`` a template uses; the config check refuses unknown ones."""
    return _VAR_RE.findall(template)


def render(template: bytes, facts: RequestFacts) -> bytes:
    """Substitute ``{variables}``; the result never carries CR, LF or NUL (a request's own
    values are already free of them, and this is checked again here)."""
    if b"{" not in template:
        return template
    out = re.sub(rb"\{([a-z_]+)\}", lambda m: facts.value(m.group(1).decode()), template)
    if b"\r" in out or b"\n" in out or b"\0" in out:
        raise ValueError("a rendered value may not contain CR, LF or NUL")
    return out


def _split_target(target: bytes) -> tuple[bytes, bytes]:
    """``/a/b?x=1`` → (``/a/b``, ``?x=1``)."""
    q = target.find(b"?")
    return (target, b"") if q < 0 else (target[:q], target[q:])


class Matcher:
    """Whether a request fits a route.  Built once; ``matches`` is called per request."""

    __slots__ = ("exact", "headers", "host", "methods", "prefix", "query", "regex", "wildcard")

    def __init__(
        self,
        *,
        host: str = "*",
        path_prefix: str = "/",
        path_exact: str | None = None,
        path_regex: str | None = None,
        methods: Sequence[str] = (),
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> None:
        h = host.lower().encode()
        self.wildcard = h == b"*"
        self.host = h
        self.prefix = path_prefix.encode()
        self.exact = path_exact.encode() if path_exact is not None else None
        # Anchored at both ends: "/api/v[0-9]+" must match the whole path, as in Envoy.
        self.regex = re.compile(path_regex.encode()) if path_regex is not None else None
        self.methods = frozenset(m.encode() for m in methods) or None
        self.headers: tuple[tuple[bytes, bytes | re.Pattern[bytes]], ...] | None = None
        if headers:
            self.headers = tuple(
                (
                    name.lower().encode(),
                    re.compile(value[1:].encode()) if value.startswith("~") else value.encode(),
                )
                for name, value in headers.items()
            )
        self.query: tuple[tuple[str, str], ...] | None = tuple(query.items()) if query else None

    def matches(
        self, method: bytes, host: bytes, target: bytes, headers: Iterable[Header]
    ) -> bool:
        """``host`` is :func:`host_only` of the authority; ``target`` the origin-form target."""
        if not target.startswith(self.prefix) and not (target == b"*" and self.prefix == b"/"):
            return False
        if not self.wildcard and self.host != host:
            pattern = self.host
            if not (pattern[:2] == b"*." and host.endswith(pattern[1:])):
                return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.exact is not None or self.regex is not None or self.query is not None:
            path, query = _split_target(target)
            if self.exact is not None and path != self.exact:
                return False
            if self.regex is not None and self.regex.fullmatch(path) is None:
                return False
            if self.query is not None and not self._query_matches(query[1:]):
                return False
        return self.headers is None or self._headers_match(headers)

    def _headers_match(self, headers: Iterable[Header]) -> bool:
        assert self.headers is not None
        fields = list(headers)
        for name, want in self.headers:
            for n, v in fields:
                if n != name:
                    continue
                if isinstance(want, bytes):
                    if v == want:
                        break
                elif want.fullmatch(v) is not None:
                    break
            else:
                return False
        return True

    def _query_matches(self, query: bytes) -> bool:
        assert self.query is not None
        try:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        except ValueError:
            return False
        have = set(pairs)
        return all(pair in have for pair in self.query)


class Rewrite:
    """Path and authority rewriting; ``None`` fields leave that part alone."""

    __slots__ = ("host", "match_prefix", "prefix", "strip")

    def __init__(
        self,
        *,
        strip_prefix: str | None = None,
        prefix_rewrite: str | None = None,
        match_prefix: str = "/",
        host_rewrite: str | None = None,
    ) -> None:
        self.strip = strip_prefix.encode() if strip_prefix is not None else None
        self.prefix = prefix_rewrite.encode() if prefix_rewrite is not None else None
        self.match_prefix = match_prefix.encode()
        self.host = host_rewrite.encode() if host_rewrite is not None else None

    @property
    def rewrites_path(self) -> bool:
        return self.strip is not None or self.prefix is not None

    def path(self, target: bytes) -> bytes:
        """The rewritten origin-form target (query kept); always starts with ``/``."""
        path, query = _split_target(target)
        if self.strip is not None:
            s = self.strip
            # "/api" strips "/api" and "/api/x" but not "/apix": a prefix of whole segments.
            if path == s or path.startswith(s.rstrip(b"/") + b"/"):
                path = path[len(s.rstrip(b"/")) :]
        elif self.prefix is not None and path.startswith(self.match_prefix):
            # Envoy's prefix_rewrite: the matched route prefix is replaced.
            path = self.prefix + path[len(self.match_prefix) :]
        if not path.startswith(b"/"):
            path = b"/" + path
        return path + query

    def authority(self, authority: bytes) -> bytes:
        return self.host if self.host is not None else authority


class HeaderRules:
    """``set`` replaces every field of that name, ``add`` appends, ``remove`` drops."""

    __slots__ = ("add", "remove", "set")

    def __init__(
        self,
        *,
        set: dict[str, str] | None = None,
        add: dict[str, str] | None = None,
        remove: Sequence[str] = (),
    ) -> None:
        self.set = tuple((k.lower().encode(), v.encode()) for k, v in (set or {}).items())
        self.add = tuple((k.lower().encode(), v.encode()) for k, v in (add or {}).items())
        self.remove = frozenset(k.lower().encode() for k in remove)

    def apply(self, headers: Sequence[Header], facts: RequestFacts) -> list[Header]:
        """A new field list with the rules applied (the input is not changed)."""
        drop = self.remove | {name for name, _ in self.set}
        out = [(n, v) for n, v in headers if n not in drop] if drop else list(headers)
        for name, value in self.set:
            out.append((name, render(value, facts)))
        for name, value in self.add:
            out.append((name, render(value, facts)))
        return out


class WeightedChoice:
    """One name out of several by weight: smooth weighted round robin, or a sticky hash."""

    __slots__ = ("current", "names", "total", "weights")

    def __init__(self, choices: Sequence[tuple[str, int]]) -> None:
        self.names = tuple(n for n, _ in choices)
        self.weights = tuple(w for _, w in choices)
        self.total = sum(self.weights)
        if self.total <= 0:
            raise ValueError("the weights must add up to more than 0")
        self.current = [0] * len(self.names)

    def next(self) -> str:
        """nginx's smooth weighted round robin: over every ``total`` picks each name comes up
        exactly ``weight`` times, spread out rather than in runs."""
        current = self.current
        best = 0
        for i, w in enumerate(self.weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.names[best]

    def sticky(self, key: bytes) -> str:
        """The same key always gives the same name (CRC-32: stable across processes)."""
        point = zlib.crc32(key) % self.total
        for name, w in zip(self.names, self.weights, strict=True):
            if point < w:
                return name
            point -= w
        raise AssertionError("unreachable: point < total")


class RateLimiter:
    """A token bucket per key (the true client address), in an LRU of at most ``max_keys``.

    ``rate`` tokens per second, up to ``burst``; each request takes one.  A key evicted from
    the LRU starts again with a full bucket: the cap bounds memory, and an evicted key is
    one that has not been seen for the longest time.
    """

    __slots__ = ("buckets", "burst", "max_keys", "rate", "rejected")

    def __init__(self, requests: int, per: float, burst: int, max_keys: int = 100_000) -> None:
        if requests < 1 or per <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("requests, per, burst and max_keys must be positive")
        self.rate = requests / per
        self.burst = float(burst)
        self.max_keys = max_keys
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, t)
        self.rejected = 0

    def allow(self, key: str, now: float) -> float:
        """0.0 if the request may go ahead (a token is taken), else seconds until one is back."""
        buckets = self.buckets
        entry = buckets.get(key)
        if entry is None:
            tokens = self.burst
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
            buckets.move_to_end(key)
        if tokens >= 1.0 - 1e-9:  # (float time: 0.1 s at 10/s is one token)
            buckets[key] = (max(tokens - 1.0, 0.0), now)
            return 0.0
        buckets[key] = (tokens, now)
        self.rejected += 1
        return (1.0 - tokens) / self.rate
