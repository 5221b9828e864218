"""Route table: (host, path) → route, first match in file order wins.

Host patterns are exact (``api.example.com``), a wildcard suffix (``*.example.com``, which
matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``) or ``*``.  The port
in the request's authority is ignored; names compare case-insensitively.

:meth:`Router.route` is where a request is routed: it first normalises the target's path
(:mod:`muxproxy.core.paths`, the listener's ``merge_slashes`` and ``escaped_slashes``) and
stores the result in the head, so the path a route matched is the path the backend receives.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import ListenerConfig, RouteConfig
from .core.frontend_h11 import RequestHead
from .core.paths import normalise_target


def host_only(authority: bytes) -> bytes:
    """``Example.com:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``."""
    a = authority.lower()
    if a.startswith(b"["):
        end = a.find(b"]")
        return a[: end + 1] if end > 0 else a
    colon = a.rfind(b":")
    return a[:colon] if colon >= 0 else a


class Router:
    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(routes)
        self._compiled = [(r.host.lower().encode(), r.path_prefix.encode(), r) for r in self.routes]

    def route(self, head: RequestHead, listener: ListenerConfig) -> RouteConfig | None:
        """Normalise ``head.target`` in place, then match it.  Raises ClientError (400) for a
        path the listener refuses (malformed or, by default, escaped slashes)."""
        if head.target != b"*":
            head.target = normalise_target(
                head.target,
                merge_slashes=listener.merge_slashes,
                escaped_slashes=listener.escaped_slashes,
            )
        return self.match(head.authority, head.target)

    def match(self, authority: bytes, path: bytes) -> RouteConfig | None:
        host = host_only(authority)
        for pattern, prefix, route in self._compiled:
            if not path.startswith(prefix) and not (path == b"*" and prefix == b"/"):
                continue
            if pattern == b"*" or pattern == host:
                return route
            if pattern[:2] == b"*." and host.endswith(pattern[1:]):
                return route
        return None
