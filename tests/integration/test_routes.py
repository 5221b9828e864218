"""Route policy end to end (issue 18): what the backend sees, what the client gets.

Real sockets on loopback: HTTP/1.1 clients → muxproxy → h2c origins.  Clients that must be
told apart by address connect from 127.0.0.2 and 127.0.0.3.
"""

from __future__ import annotations

import collections
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest

from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin

from .harness import Harness, running
from .origin import Script

pytestmark = pytest.mark.anyio


def route(text: str) -> str:
    return "[[routes]]\n" + text.strip() + "\n"


def seen(body: bytes) -> dict[str, str]:
    return {k: v for k, v in json.loads(body)}


async def from_address(h: Harness, local: str) -> H1Client:
    return H1Client(await anyio.connect_tcp(h.addr.host, h.addr.port, local_host=local))


async def test_strip_prefix_host_rewrite_and_request_header_rules() -> None:
    routes = route(
        """
        path_prefix = "/api/"
        cluster = "app"
        strip_prefix = "/api"
        host_rewrite = "svc.internal"
        name = "api"
        request_headers.set = { x-team = "web" }
        request_headers.add = { x-client = "{client_ip}", x-route = "{route}" }
        request_headers.remove = ["cookie"]
        """
    )
    async with running(Script(), routes=routes) as h:
        r = await h.get(
            "/api/headers?x=1", host="www.example", headers=[("cookie", "s=1"), ("x-team", "a")]
        )
        assert r.status == 200
        d = seen(r.body)
        assert d[":path"] == "/headers?x=1"
        assert d[":authority"] == "svc.internal"
        assert d["x-forwarded-host"] == "www.example"  # what the client asked for
        assert d["x-team"] == "web"
        assert d["x-client"] == "127.0.0.1"
        assert d["x-route"] == "api"
        assert "cookie" not in d
        assert (await h.get("/other")).status == 404


async def test_prefix_rewrite_replaces_the_matched_prefix() -> None:
    routes = route('path_prefix = "/v1/"\nprefix_rewrite = "/"\ncluster = "app"')
    async with running(Script(), routes=routes) as h:
        r = await h.get("/v1/headers")
        assert seen(r.body)[":path"] == "/headers"


async def test_response_header_rules() -> None:
    routes = route(
        """
        cluster = "app"
        response_headers.set = { x-served-by = "{route}" }
        response_headers.add = { x-extra = "1" }
        response_headers.remove = ["x-echo-length"]
        """
    )
    async with running(Script(), routes=routes) as h:
        c = await h.client()
        r = await c.request("POST", "/echo", body=b"hi")
        await c.aclose()
        assert (r.status, r.body) == (200, b"hi")
        assert r.header(b"x-served-by") == b"routes[0]"
        assert r.header(b"x-extra") == b"1"
        assert r.header(b"x-echo-length") is None


async def test_redirect_and_direct_answers_need_no_backend() -> None:
    routes = (
        route('path_prefix = "/old"\nredirect = { to = "https://{host}{path}" }')
        + route('path_exact = "/ping"\nrespond = { status = 204 }')
        + route('path_exact = "/blocked"\nrespond = { status = 403, body = "no\\n" }')
        + route('cluster = "app"')
    )
    script = Script()
    async with running(script, routes=routes) as h:
        c = await h.client()
        r = await c.request("GET", "/old/page?q=1", host="www.example:8080")
        assert r.status == 308
        assert r.header(b"location") == b"https://www.example/old/page?q=1"
        r = await c.request("GET", "/ping")
        assert (r.status, r.body) == (204, b"")
        r = await c.request("GET", "/blocked")
        assert (r.status, r.body) == (403, b"no\n")
        assert r.header(b"content-type") == b"text/plain; charset=utf-8"
        r = await c.request("GET", "/hello")  # the same connection goes on
        assert (r.status, r.body) == (200, b"hello\n")
        await c.aclose()
        assert h.origin.requests_received == 1


@asynccontextmanager
async def two_clusters(routes: str) -> AsyncIterator[tuple[Harness, Script, Script]]:
    app, canary = Script(), Script()
    other = H2Origin(canary)
    async with anyio.create_task_group() as tg:
        port = await tg.start(partial(other.serve, ssl_context=None))
        text = (
            f'[[clusters]]\nname = "canary"\nprotocol = "h2c"\nbackends = ["127.0.0.1:{port}"]\n'
            + routes
        )
        async with running(app, routes=text) as h:
            yield h, app, canary
        tg.cancel_scope.cancel()


async def test_weighted_split_95_5_over_10000_requests() -> None:
    routes = route('clusters = [{ name = "app", weight = 95 }, { name = "canary", weight = 5 }]')
    async with two_clusters(routes) as (h, app, canary):

        async def loop(n: int) -> None:
            c = await h.client()
            for _ in range(n):
                assert (await c.request("GET", "/hello")).status == 200
            await c.aclose()

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(loop, 500)
        total = app.served + canary.served
        assert total == 10_000
        assert abs(canary.served / total - 0.05) <= 0.01, (app.served, canary.served)


async def test_sticky_header_keeps_each_user_on_one_cluster() -> None:
    routes = route(
        """
        clusters = [{ name = "app", weight = 50 }, { name = "canary", weight = 50 }]
        sticky = "header:x-user"
        """
    )
    async with two_clusters(routes) as (h, app, _canary):
        where: dict[str, set[str]] = collections.defaultdict(set)
        for _ in range(5):
            for u in range(40):
                before = app.served
                c = await h.client()
                r = await c.request("GET", "/hello", headers=[("x-user", f"u{u}")])
                assert r.status == 200
                await c.aclose()
                where[f"u{u}"].add("app" if app.served > before else "canary")
        assert all(len(v) == 1 for v in where.values())
        assert {next(iter(v)) for v in where.values()} == {"app", "canary"}


async def test_rate_limit_429_with_retry_after_and_other_clients_unaffected() -> None:
    routes = route('cluster = "app"\nrate_limit = { requests = 5, per = "60s" }')
    async with running(Script(), routes=routes) as h:
        a = await from_address(h, "127.0.0.2")
        statuses = [(await a.request("GET", "/hello")).status for _ in range(5)]
        assert statuses == [200] * 5
        r = await a.request("GET", "/hello")
        assert r.status == 429
        retry = r.header(b"retry-after")
        assert retry is not None and 1 <= int(retry) <= 12
        await a.aclose()
        b = await from_address(h, "127.0.0.3")
        assert (await b.request("GET", "/hello")).status == 200
        await b.aclose()


async def test_per_route_request_timeout_and_max_body() -> None:
    routes = (
        route('path_prefix = "/stall"\ncluster = "app"\nrequest_timeout = "300ms"')
        + route('path_prefix = "/echo"\ncluster = "app"\nmax_body = "10B"')
        + route('cluster = "app"')
    )
    async with running(Script(), routes=routes) as h:
        r = await h.get("/stall")
        assert r.status == 504
        c = await h.client()
        r = await c.request("POST", "/echo", body=b"x" * 11)
        assert r.status == 413
        await c.aclose()
        c = await h.client()
        r = await c.request("POST", "/echo", body=b"x" * 10)
        assert (r.status, r.body) == (200, b"x" * 10)
        await c.aclose()


async def test_max_connections_per_client() -> None:
    async with running(Script(), listener={"max_connections_per_client": 2}) as h:
        a1 = await from_address(h, "127.0.0.2")
        a2 = await from_address(h, "127.0.0.2")
        assert (await a1.request("GET", "/hello")).status == 200
        assert (await a2.request("GET", "/hello")).status == 200
        a3 = await from_address(h, "127.0.0.2")
        r = await a3.read_response()
        assert r.status == 429
        b = await from_address(h, "127.0.0.3")  # another address is unaffected
        assert (await b.request("GET", "/hello")).status == 200
        await a2.aclose()
        for c in (a1, a3, b):
            await c.aclose()
