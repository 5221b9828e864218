"""ASGI app for hypercorn: a WebSocket echo with subprotocols, close codes on request, and a
/stats endpoint telling how many handlers are live and which TCP connections carried them."""

from __future__ import annotations

import json
from typing import Any

import priority

# hypercorn 0.18 builds its HTTP/2 priority tree with the `priority` library's default cap of
# 1,000 streams, and a 1,001st concurrent stream kills the whole connection
# (TooManyStreamsError), whatever h2_max_concurrent_streams says.  The fan-in test needs
# 2,500 streams per connection, so the cap follows the configured limit here.
_tree_init = priority.PriorityTree.__init__


def _roomier_tree(self: priority.PriorityTree, maximum_streams: int = 1000) -> None:
    _tree_init(self, maximum_streams=max(maximum_streams, 10_000))


priority.PriorityTree.__init__ = _roomier_tree  # type: ignore[method-assign]

LIVE = 0
PEERS: set[str] = set()  # "host:port" of the TCP connections the WebSockets came over
TOTAL = 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global LIVE, TOTAL
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        body = json.dumps({"live": LIVE, "total": TOTAL, "peers": sorted(PEERS)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return
    # websocket
    msg = await receive()
    assert msg["type"] == "websocket.connect"
    offered = scope.get("subprotocols") or []
    chosen = next((p for p in offered if p in ("chat", "superchat")), None)
    await send({"type": "websocket.accept", "subprotocol": chosen})
    LIVE += 1
    TOTAL += 1
    client = scope.get("client")
    if client:
        PEERS.add(f"{client[0]}:{client[1]}")
    try:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is not None and text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text[6:])})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": msg.get("bytes")})
    finally:
        LIVE -= 1
