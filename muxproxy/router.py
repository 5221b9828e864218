"""Route table: (host, path) → route, first match in file order wins.

Host patterns are exact (``api.example.com``), a wildcard suffix (``*.example.com``, which
matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``) or ``*``.  The port
in the request's authority is ignored; names compare case-insensitively.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import RouteConfig


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
