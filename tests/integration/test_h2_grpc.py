"""gRPC through muxproxy (issue 14): a grpcio server as the h2c backend, a grpcio client over
TLS (ALPN h2) and over h2c; unary, server-, client- and bidirectional streaming, status codes
and trailing metadata, and a client deadline that cancels the backend stream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from .h2harness import running_h2

pytestmark = pytest.mark.anyio

STREAMED = 10_000


class Backend:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.slow_started = threading.Event()

    def unary(self, req: bytes, ctx: Any) -> bytes:
        if req == b"fail":
            ctx.set_trailing_metadata([("x-why", "asked-to")])
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        ctx.set_trailing_metadata([("x-trail", "unary")])
        return b"echo:" + req

    def server_stream(self, req: bytes, ctx: Any) -> Iterator[bytes]:
        for i in range(STREAMED):
            yield b"%d" % i
        ctx.set_trailing_metadata([("x-count", str(STREAMED))])

    def client_stream(self, reqs: Iterator[bytes], ctx: Any) -> bytes:
        total = 0
        n = 0
        for r in reqs:
            total += len(r)
            n += 1
        return b"%d/%d" % (n, total)

    def bidi(self, reqs: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        for r in reqs:
            yield r.upper()

    def slow(self, req: bytes, ctx: Any) -> bytes:
        ctx.add_callback(self.cancelled.set)
        self.slow_started.set()
        self.cancelled.wait(30)
        return b"late"


def start_backend() -> tuple[Any, int, Backend]:
    b = Backend()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(b.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(b.server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(b.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(b.bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(b.slow),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Svc", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, b


def exercise(channel: Any, backend: Backend) -> None:
    """Every kind of call, checked (runs in a thread: grpcio's client blocks)."""
    unary = channel.unary_unary("/t.Svc/Unary")
    resp, call = unary.with_call(b"hi", timeout=20)
    assert resp == b"echo:hi"
    assert ("x-trail", "unary") in call.trailing_metadata()
    with pytest.raises(grpc.RpcError) as err:
        unary(b"fail", timeout=20)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "no such thing"
    assert ("x-why", "asked-to") in err.value.trailing_metadata()

    stream = channel.unary_stream("/t.Svc/ServerStream")(b"", timeout=60)
    got = list(stream)
    assert got == [b"%d" % i for i in range(STREAMED)]
    assert ("x-count", str(STREAMED)) in stream.trailing_metadata()
    assert stream.code() == grpc.StatusCode.OK

    cs = channel.stream_unary("/t.Svc/ClientStream")
    assert cs(iter([b"x" * 1000] * 500), timeout=30) == b"500/500000"

    bidi = channel.stream_stream("/t.Svc/Bidi")
    msgs = [b"m%d" % i for i in range(200)]
    assert list(bidi(iter(msgs), timeout=30)) == [m.upper() for m in msgs]

    slow = channel.unary_unary("/t.Svc/Slow")
    with pytest.raises(grpc.RpcError) as err:
        slow(b"", timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert backend.slow_started.is_set()
    # The client's RST_STREAM went on to the backend: its call was cancelled.
    assert backend.cancelled.wait(10)


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
async def test_grpc_through_the_proxy(tls: bool, tmp_path: Path) -> None:
    server, port, backend = start_backend()
    try:
        async with running_h2(
            None, backends=[f"127.0.0.1:{port}"], tls_dir=tmp_path if tls else None
        ) as h:
            target = f"127.0.0.1:{h.addr.port}"
            if h.ca_file is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=h.ca_file.read_bytes())
                channel = grpc.secure_channel(
                    target, creds, options=[("grpc.ssl_target_name_override", "localhost")]
                )
            else:
                channel = grpc.insecure_channel(target)
            try:
                await anyio.to_thread.run_sync(exercise, channel, backend)
            finally:
                channel.close()
    finally:
        server.stop(None)
