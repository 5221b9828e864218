"""Router: (authority, path) → first matching route in file order (DESIGN.md §5)."""

from __future__ import annotations

import pytest

from muxproxy.config import RouteConfig
from muxproxy.router import Router, host_only

ROUTES = [
    RouteConfig(cluster="api-v1", host="api.example.com", path_prefix="/v1/"),
    RouteConfig(cluster="api", host="API.Example.com"),
    RouteConfig(cluster="wild", host="*.example.com", path_prefix="/app"),
    RouteConfig(cluster="v6", host="[::1]"),
    RouteConfig(cluster="static", host="*", path_prefix="/static/"),
    RouteConfig(cluster="only-example", host="example.org"),
]


@pytest.mark.parametrize(
    ("authority", "path", "cluster"),
    [
        # exact host, path prefix, first match wins over a later, broader route
        (b"api.example.com", b"/v1/users", "api-v1"),
        (b"api.example.com", b"/v2/users", "api"),
        (b"api.example.com", b"/v1", "api"),  # "/v1" does not start with "/v1/"
        # the port is ignored, names compare case-insensitively
        (b"api.example.com:8443", b"/v1/x", "api-v1"),
        (b"API.EXAMPLE.COM:80", b"/v1/x", "api-v1"),
        (b"Api.Example.Com", b"/", "api"),
        # "*.suffix" matches one or more labels, but not the bare suffix
        (b"www.example.com", b"/app/x", "wild"),
        (b"a.b.example.com:81", b"/apple", "wild"),
        (b"WWW.Example.COM", b"/app", "wild"),
        (b"example.com", b"/app/x", None),
        (b"badexample.com", b"/app/x", None),
        (b"www.example.com", b"/other", None),
        # IPv6 literals keep their brackets, lose their port
        (b"[::1]:8080", b"/x", "v6"),
        (b"[::1]", b"/x", "v6"),
        # "*" matches any host (also none) once the path fits
        (b"anything.test", b"/static/logo.png", "static"),
        (b"", b"/static/", "static"),
        (b"www.example.com", b"/static/x", "static"),
        # exact means exact
        (b"example.org", b"/", "only-example"),
        (b"www.example.org", b"/", None),
        (b"example.org.evil", b"/", None),
        (b"example.or", b"/", None),
        (b"nowhere.test", b"/", None),
    ],
)
def test_match_table(authority: bytes, path: bytes, cluster: str | None) -> None:
    route = Router(ROUTES).match(authority, path)
    assert (route.cluster if route else None) == cluster


def test_first_match_in_order_wins() -> None:
    a = RouteConfig(cluster="a", host="*")
    b = RouteConfig(cluster="b", host="x.test")
    assert Router([a, b]).match(b"x.test", b"/") is a
    assert Router([b, a]).match(b"x.test", b"/") is b
    assert Router([b, a]).match(b"y.test", b"/") is a


def test_asterisk_form_matches_root_prefix_only() -> None:
    root = RouteConfig(cluster="root", host="*")
    sub = RouteConfig(cluster="sub", host="*", path_prefix="/api")
    assert Router([sub, root]).match(b"h", b"*") is root
    assert Router([sub]).match(b"h", b"*") is None


def test_empty_router() -> None:
    assert Router([]).match(b"h", b"/") is None


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        (b"Example.com:8080", b"example.com"),
        (b"example.com", b"example.com"),
        (b"[::1]:80", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"[2001:DB8::1]:443", b"[2001:db8::1]"),
        (b"", b""),
    ],
)
def test_host_only(authority: bytes, host: bytes) -> None:
    assert host_only(authority) == host
