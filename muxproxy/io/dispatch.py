"""One request, routed: the same for every client protocol.

A client connection (HTTP/1.1 today, an HTTP/2 stream next) hands each request head here
with the :class:`~muxproxy.io.downstream.Downstream` it answers through.  This module applies
the route's policy (``router.Route``, built from the pure pieces in ``core/routing.py``) in
one order, so no client protocol decides it again:

1. no route → 404;
2. ``rate_limit`` → 429 with ``retry-after`` (per true client address, per worker);
3. ``respond`` / ``redirect`` → answered here, no backend involved;
4. ``max_body`` (the route's override) → 413 for a declared length over it;
5. the cluster: ``cluster``, or one of the weighted ``clusters`` (sticky or not);
6. a WebSocket upgrade on a route that allows it → :class:`~muxproxy.io.tunnel.Tunnel`,
   anything else → :class:`~muxproxy.io.exchange.Exchange` (which applies the rewrites,
   header rules and per-route timeouts as it builds the backend head and relays the answer).

Returns whether the client connection can be kept alive, like the relays themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from ..core.frontend_h11 import Body, RequestHead
from ..core.websocket import is_upgrade
from ..errors import ClientError, ProxyError
from ..router import Route
from .downstream import Downstream, TunnelDownstream
from .exchange import Exchange
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .pool import ClusterPool

__all__ = ["dispatch"]


def dispatch(
    down: TunnelDownstream,
    head: RequestHead,
    route: Route | None,
    pools: dict[str, ClusterPool],
    *,
    websocket: bool | None = None,
) -> Awaitable[bool]:
    """Route one request and relay it; whether the client connection may be kept.  A plain
    function that decides at once and returns the relay to await (one coroutine fewer per
    request than an ``async def`` around it).
    ``websocket``: the request is a WebSocket (an HTTP/2 extended CONNECT, RFC 8441);
    None: an HTTP/1.1 upgrade decides."""
    if route is None:
        return down.send_error(ProxyError("no route for this host and path", 404))
    cfg = route.config
    outcome = down.outcome
    outcome.route = route.name
    limiter = route.limiter
    if limiter is not None:
        wait = limiter.allow(down.fwd.client_ip, time.monotonic())
        if wait > 0:
            outcome.reason = "rate_limited"
            retry = str(max(1, math.ceil(wait))).encode()
            return _refuse(
                down, head, ProxyError("rate limit reached", 429, ((b"retry-after", retry),))
            )
    if cfg.respond is not None or cfg.redirect is not None:
        return _answer_here(down, head, route)
    if cfg.max_body is not None and (head.content_length or 0) > cfg.max_body:
        outcome.reason = "refused_limit"
        return _refuse(down, head, ClientError("request body larger than max_body", 413))
    cluster = route.cluster_for(down.fwd.client_ip, head.headers)
    outcome.cluster = cluster
    pool = pools[cluster]
    if websocket is None:
        websocket = cfg.websocket and is_upgrade(head.headers)
    elif websocket and not cfg.websocket:  # (HTTP/2: a CONNECT cannot become a GET)
        return down.send_error(ProxyError("no WebSockets on this route", 404))
    if websocket:
        outcome.protocol = "websocket"
        return Tunnel(down, head, route, pool).run()
    return Exchange(down, head, route, pool).run()


async def _refuse(down: Downstream, head: RequestHead, exc: ProxyError) -> bool:
    """Answer before any backend was involved.  A request with a body is answered as a
    refusal (the connection closes after a bounded lingering drain) rather than by reading
    a body of any size to keep the connection in step."""
    if head.has_body and not isinstance(exc, ClientError):
        exc = ClientError(exc.reason, exc.status_hint, exc.headers)
    return await down.send_error(exc)


# A request body this small is read and dropped before a local answer, so the connection can
# be kept; a larger (or chunked) one is not read: the connection closes after the answer.
DROP_BODY_UP_TO = 64 * 1024


async def _answer_here(down: Downstream, head: RequestHead, route: Route) -> bool:
    """``respond`` or ``redirect``: the proxy answers, no backend involved."""
    cfg = route.config
    unread = False
    if head.has_body:
        n = head.content_length
        if n is not None and n <= DROP_BODY_UP_TO:
            while type(await down.read_body()) is Body:
                pass
        else:
            unread = True
    facts = route.facts(down.fwd, down.outcome.request_id, head)
    if cfg.redirect is not None:
        status = cfg.redirect.status
        body = b""
        headers = [(b"location", route.redirect_location(facts)), (b"content-length", b"0")]
    else:
        assert cfg.respond is not None
        status = cfg.respond.status
        body = b"" if status in (204, 304) else cfg.respond.body.encode()
        headers = []
        if body or status not in (204, 304):
            headers = [
                (b"content-type", cfg.respond.content_type.encode()),
                (b"content-length", b"%d" % len(body)),
            ]
    if route.response_rules is not None:
        headers = route.response_rules.apply(headers, facts)
    down.send_head(status, headers)
    keep = True
    if body and head.method != b"HEAD":
        keep = down.send_data(body)
    keep = down.end(None) and keep
    await down.flush()
    return keep and not unread
