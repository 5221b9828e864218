"""The admin listener: /healthz, /pools and /metrics describe the pools as they are."""

from __future__ import annotations

import json

import anyio
import pytest

from muxproxy.demo.h1client import H1Client

from .harness import running, wait_for
from .origin import Script

pytestmark = pytest.mark.anyio


async def admin_get(addr: object, path: str) -> tuple[int, bytes]:
    c = await H1Client.connect(addr.host, addr.port)  # type: ignore[attr-defined]
    try:
        r = await c.request("GET", path)
        return r.status, r.body
    finally:
        await c.aclose()


async def test_admin_endpoints_report_pools() -> None:
    script = Script()
    async with running(script, cluster={"connections": 2}, admin=True) as h:
        assert h.admin is not None
        await wait_for(lambda: h.pool().statistics().connections == 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.get, "/block")
            await wait_for(lambda: len(script.started) == 1)
            status, body = await admin_get(h.admin, "/healthz")
            assert (status, body) == (200, b"ok\n")
            status, body = await admin_get(h.admin, "/pools")
            pools = json.loads(body)
            assert pools["app"]["connections"] == 2
            assert pools["app"]["streams_open"] == 1
            status, body = await admin_get(h.admin, "/metrics")
            text = body.decode()
            assert status == 200
            assert "# TYPE muxproxy_connection_streams_open gauge" in text
            open_streams = [
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("muxproxy_connection_streams_open{")
            ]
            assert sorted(open_streams) == [0.0, 1.0]  # one stream, on one of 2 connections
            assert 'muxproxy_pool_events_total{cluster="app",event="connections_opened"} 2' in text
            script.release.set()
        status, _ = await admin_get(h.admin, "/nope")
        assert status == 404
