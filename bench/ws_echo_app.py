"""ASGI WebSocket echo backend for bench/ws_scale.py, served by hypercorn.

One hypercorn port speaks HTTP/1.1 (the nginx row: classic `Upgrade: websocket`) and h2c with
prior knowledge (muxproxy and HAProxy: RFC 8441 extended CONNECT). Every WebSocket echoes what
it receives; `GET /stats` (plain HTTP) answers `{"live": ..., "total": ...}`: WebSocket
handlers alive now and accepted since start, so the harness can check the backend really holds
the N tunnels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import priority
from priority.priority import (
    DeadlockError,
    DuplicateStreamError,
    MissingStreamError,
    PriorityTree,
)

# Two changes to hypercorn 0.18's HTTP/2 stream scheduling, made here because hypercorn imports
# this module before it accepts anything:
#
# 1. It builds its priority tree with the `priority` library's default cap of 1,000 streams, and
#    a 1,001st concurrent stream kills the whole connection (TooManyStreamsError) whatever
#    `h2_max_concurrent_streams` says. The cap is lifted; the real per-connection limit is
#    `h2_max_concurrent_streams` in the hypercorn config (bench/conf/ws-hypercorn.toml.tmpl).
# 2. `priority.PriorityTree.__next__` (asked once per DATA frame hypercorn sends) pops every
#    blocked stream off a heap before it finds an active one, so with thousands of idle
#    WebSockets on one connection each echoed message costs O(streams log streams): at 4,000
#    streams over 2 connections the backend alone spends its CPU there and the echo p50 passes
#    300 ms. It is replaced by RoundRobinTree below (O(1), no weights), unless the environment
#    sets WS_BENCH_H2_SCHEDULER=stock (`ws_scale.py --backend-scheduler stock`).
_MAX_TREE_STREAMS = 1_000_000
_tree_init = PriorityTree.__init__


def _roomier_tree(self: Any, maximum_streams: int = 1000) -> None:
    _tree_init(self, maximum_streams=max(maximum_streams, _MAX_TREE_STREAMS))


class RoundRobinTree:
    """The part of priority.PriorityTree that hypercorn 0.18 uses, as a round robin over the
    unblocked streams (PRIORITY weights and dependencies are accepted and ignored)."""

    def __init__(self, maximum_streams: int = 1000) -> None:
        self._streams: set[int] = set()
        self._active: dict[int, None] = {}  # insertion-ordered set of unblocked streams

    def _known(self, stream_id: int) -> None:
        if stream_id not in self._streams:
            raise MissingStreamError(f"Stream {stream_id} not in tree")

    def insert_stream(
        self,
        stream_id: int,
        depends_on: int | None = None,
        weight: int = 16,
        exclusive: bool = False,
    ) -> None:
        if stream_id in self._streams:
            raise DuplicateStreamError(f"Stream {stream_id} already in tree")
        self._streams.add(stream_id)
        self._active[stream_id] = None  # like priority: a new stream starts unblocked

    def reprioritize(
        self,
        stream_id: int,
        depends_on: int | None = None,
        weight: int = 16,
        exclusive: bool = False,
    ) -> None:
        self._known(stream_id)

    def remove_stream(self, stream_id: int) -> None:
        self._known(stream_id)
        self._streams.discard(stream_id)
        self._active.pop(stream_id, None)

    def block(self, stream_id: int) -> None:
        self._known(stream_id)
        self._active.pop(stream_id, None)

    def unblock(self, stream_id: int) -> None:
        self._known(stream_id)
        self._active[stream_id] = None

    def __iter__(self) -> RoundRobinTree:
        return self

    def __next__(self) -> int:
        if not self._active:
            raise DeadlockError("No unblocked streams to schedule.")
        stream_id = next(iter(self._active))
        del self._active[stream_id]  # to the back of the queue
        self._active[stream_id] = None
        return stream_id


SCHEDULER = os.environ.get("WS_BENCH_H2_SCHEDULER", "roundrobin")
if SCHEDULER == "stock":
    PriorityTree.__init__ = _roomier_tree  # type: ignore[method-assign]
else:
    priority.PriorityTree = RoundRobinTree  # type: ignore[attr-defined,assignment]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LIVE = 0
TOTAL = 0


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    global LIVE, TOTAL
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        body = json.dumps({"live": LIVE, "total": TOTAL}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    # websocket
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    LIVE += 1
    TOTAL += 1
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes")})
    finally:
        LIVE -= 1
