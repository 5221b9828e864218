"""The ASGI app that hypercorn serves over HTTP/3 in interop/test_h3_peers.py.

- ``GET /small`` and ``GET /big``: the files ``small`` and ``big`` of the directory named by
  the ``H3_APP_ROOT`` environment variable (the same files Caddy serves)
- ``POST /echo``: the request body, exactly
- every response carries ``X-Peer`` (the client's port, i.e. which of muxproxy's QUIC
  connections carried the request: each has its own UDP socket) and ``X-Proto`` (the HTTP
  version hypercorn saw, "3" over QUIC)
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ROOT = Path(os.environ.get("H3_APP_ROOT", "."))
FILES = {f"/{name}": (_ROOT / name).read_bytes() for name in ("small", "big")}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    request_body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        request_body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    method, path = scope["method"], scope["path"]
    if method == "GET" and path in FILES:
        status, body = 200, FILES[path]
    elif method == "POST" and path == "/echo":
        status, body = 200, bytes(request_body)
    else:
        status, body = 404, b"no such path\n"
    client = scope.get("client")
    headers = [
        (b"content-length", str(len(body)).encode()),
        (b"x-peer", str(client[1] if client else "?").encode()),
        (b"x-proto", str(scope.get("http_version", "?")).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
