"""Route policy (core/routing.py, router.py): matchers, rewrites, header rules, splits, limits.

Tables in the h11 manner: each row is one request and what the route must make of it.
"""

from __future__ import annotations

import collections

import pytest

from muxproxy.config import ConfigError, RouteConfig, loads
from muxproxy.core.routing import (
    HeaderRules,
    Matcher,
    RateLimiter,
    RequestFacts,
    Rewrite,
    WeightedChoice,
    render,
)
from muxproxy.router import Router

# --- matching ---------------------------------------------------------------------------

M_ROUTES = [
    RouteConfig(name="exact", cluster="a", path_exact="/health"),
    RouteConfig(name="regex", cluster="a", path_regex=r"/users/[0-9]+"),
    RouteConfig(name="post-only", cluster="a", path_prefix="/upload", methods=("POST", "PUT")),
    RouteConfig(name="beta-header", cluster="a", path_prefix="/app", headers={"x-beta": "1"}),
    RouteConfig(name="ua", cluster="a", path_prefix="/app", headers={"user-agent": "~curl/.*"}),
    RouteConfig(name="query", cluster="a", path_prefix="/search", query={"v": "2"}),
    RouteConfig(name="host", cluster="a", host="*.example.com", path_prefix="/app"),
    RouteConfig(name="fallback", cluster="a"),
]


@pytest.mark.parametrize(
    ("method", "authority", "target", "headers", "route"),
    [
        # path_exact: the path alone, the query does not count
        (b"GET", b"x", b"/health", [], "exact"),
        (b"GET", b"x", b"/health?full=1", [], "exact"),
        (b"GET", b"x", b"/health/", [], "fallback"),
        (b"GET", b"x", b"/healthz", [], "fallback"),
        # path_regex is anchored at both ends
        (b"GET", b"x", b"/users/42", [], "regex"),
        (b"GET", b"x", b"/users/42?x=1", [], "regex"),
        (b"GET", b"x", b"/users/42/posts", [], "fallback"),
        (b"GET", b"x", b"/api/users/42", [], "fallback"),
        (b"GET", b"x", b"/users/abc", [], "fallback"),
        # methods
        (b"POST", b"x", b"/upload/file", [], "post-only"),
        (b"PUT", b"x", b"/upload", [], "post-only"),
        (b"GET", b"x", b"/upload/file", [], "fallback"),
        # headers: exact value, then ~regex (fullmatch)
        (b"GET", b"x", b"/app", [(b"x-beta", b"1")], "beta-header"),
        (b"GET", b"x", b"/app", [(b"x-beta", b"2"), (b"x-beta", b"1")], "beta-header"),
        (b"GET", b"x", b"/app", [(b"x-beta", b"10")], "fallback"),
        (b"GET", b"x", b"/app", [(b"user-agent", b"curl/8.5.0")], "ua"),
        (b"GET", b"x", b"/app", [(b"user-agent", b"xcurl/8")], "fallback"),
        (b"GET", b"www.example.com", b"/app", [(b"user-agent", b"Mozilla")], "host"),
        # query parameters, decoded as a form would be, order free
        (b"GET", b"x", b"/search?q=a&v=2", [], "query"),
        (b"GET", b"x", b"/search?v=2", [], "query"),
        (b"GET", b"x", b"/search?v=%32", [], "query"),
        (b"GET", b"x", b"/search?v=3", [], "fallback"),
        (b"GET", b"x", b"/search", [], "fallback"),
    ],
)
def test_first_matching_route_wins(
    method: bytes, authority: bytes, target: bytes, headers: list[tuple[bytes, bytes]], route: str
) -> None:
    found = Router(M_ROUTES).match_route(authority, target, method, headers)
    assert found is not None and found.name == route


def test_the_host_index_keeps_file_order_across_exact_and_wildcard_hosts() -> None:
    router = Router(
        [
            RouteConfig(name="wild-a", cluster="x", path_prefix="/a"),
            RouteConfig(name="h", cluster="x", host="h.test"),
            RouteConfig(name="suffix", cluster="x", host="*.test"),
            RouteConfig(name="h-late", cluster="x", host="h.test", path_prefix="/late"),
            RouteConfig(name="wild", cluster="x"),
        ]
    )
    cases = {
        (b"h.test", b"/a/1"): "wild-a",
        (b"h.test:81", b"/b"): "h",
        (b"H.TEST", b"/late"): "h",
        (b"g.test", b"/late"): "suffix",
        (b"other", b"/late"): "wild",
    }
    for (authority, target), name in cases.items():
        found = router.match_route(authority, target)
        assert found is not None and found.name == name, (authority, target)


def test_a_route_without_extra_conditions_matches_as_before() -> None:
    m = Matcher(host="api.example.com", path_prefix="/v1/")
    assert m.matches(b"GET", b"api.example.com", b"/v1/x", [])
    assert not m.matches(b"GET", b"api.example.com", b"/v2/x", [])
    assert not m.matches(b"GET", b"www.example.com", b"/v1/x", [])


def test_route_names_default_to_their_position() -> None:
    r = Router([RouteConfig(cluster="a"), RouteConfig(cluster="b", name="named")])
    assert [c.name for c in r.compiled] == ["routes[0]", "named"]


# --- rewriting --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewrite", "target", "expected"),
    [
        # strip_prefix removes whole leading segments, keeps the query, never leaves ""
        (Rewrite(strip_prefix="/api"), b"/api/users?x=1", b"/users?x=1"),
        (Rewrite(strip_prefix="/api"), b"/api", b"/"),
        (Rewrite(strip_prefix="/api"), b"/api?x", b"/?x"),
        (Rewrite(strip_prefix="/api/"), b"/api/users", b"/users"),
        (Rewrite(strip_prefix="/api"), b"/apiary", b"/apiary"),
        (Rewrite(strip_prefix="/api"), b"/other", b"/other"),
        # prefix_rewrite replaces the route's matched prefix (Envoy's rule)
        (Rewrite(prefix_rewrite="/v2/", match_prefix="/api/"), b"/api/users", b"/v2/users"),
        (Rewrite(prefix_rewrite="/", match_prefix="/api/"), b"/api/users?a=b", b"/users?a=b"),
        (Rewrite(prefix_rewrite="/v2", match_prefix="/api"), b"/api", b"/v2"),
        (Rewrite(prefix_rewrite="", match_prefix="/api"), b"/api", b"/"),
        (Rewrite(prefix_rewrite="/new", match_prefix="/"), b"/x", b"/newx"),
    ],
)
def test_rewrites_always_give_an_origin_form_target(
    rewrite: Rewrite, target: bytes, expected: bytes
) -> None:
    assert rewrite.path(target) == expected


def test_host_rewrite_sets_the_authority() -> None:
    assert Rewrite(host_rewrite="svc.internal").authority(b"example.com") == b"svc.internal"
    assert Rewrite().authority(b"example.com") == b"example.com"


# --- header rules -----------------------------------------------------------------------

FACTS = RequestFacts(
    client_ip="192.0.2.7",
    request_id="abc123",
    route="api",
    host=b"example.com",
    path=b"/a?b",
    method=b"GET",
    scheme=b"https",
)


def test_header_rules_set_add_remove_with_variables() -> None:
    rules = HeaderRules(
        set={"x-team": "web", "X-Client": "{client_ip}"},
        add={"x-trace": "{request_id}/{route}"},
        remove=["x-internal", "Cookie"],
    )
    out = rules.apply(
        [
            (b"x-team", b"old"),
            (b"x-team", b"older"),
            (b"cookie", b"a=b"),
            (b"x-internal", b"1"),
            (b"accept", b"*/*"),
            (b"x-trace", b"upstream"),
        ],
        FACTS,
    )
    assert out == [
        (b"accept", b"*/*"),
        (b"x-trace", b"upstream"),
        (b"x-team", b"web"),
        (b"x-client", b"192.0.2.7"),
        (b"x-trace", b"abc123/api"),
    ]


def test_render_refuses_line_breaks() -> None:
    assert render(b"https://{host}{path}", FACTS) == b"https://example.com/a?b"
    bad = RequestFacts(host=b"evil\r\nx: y")
    with pytest.raises(ValueError):
        render(b"{host}", bad)


# --- weighted clusters ------------------------------------------------------------------


def test_smooth_weighted_round_robin_gives_exact_shares() -> None:
    choice = WeightedChoice([("app", 95), ("canary", 5)])
    counts = collections.Counter(choice.next() for _ in range(10_000))
    assert counts == {"app": 9_500, "canary": 500}
    # and spreads the canary out instead of sending it 5 in a row
    first = [choice.next() for _ in range(100)]
    runs = "".join("c" if n == "canary" else "." for n in first).split(".")
    assert max(len(run) for run in runs) == 1


def test_zero_weight_gets_nothing() -> None:
    choice = WeightedChoice([("a", 1), ("off", 0)])
    assert {choice.next() for _ in range(50)} == {"a"}
    assert {choice.sticky(str(i).encode()) for i in range(500)} == {"a"}


def test_sticky_keys_never_change_cluster_and_split_by_weight() -> None:
    choice = WeightedChoice([("app", 90), ("canary", 10)])
    first = {i: choice.sticky(f"user-{i}".encode()) for i in range(5_000)}
    for _ in range(3):
        assert {i: choice.sticky(f"user-{i}".encode()) for i in range(5_000)} == first
    share = sum(1 for v in first.values() if v == "canary") / len(first)
    assert 0.07 < share < 0.13


def test_route_sticky_on_a_header_falls_back_to_the_client_address() -> None:
    cfg = loads(
        """
        [[listeners]]
        name = "e"
        listen = "127.0.0.1:0"
        [[clusters]]
        name = "a"
        backends = ["127.0.0.1:1"]
        [[clusters]]
        name = "b"
        backends = ["127.0.0.1:2"]
        [[routes]]
        clusters = [{ name = "a", weight = 1 }, { name = "b", weight = 1 }]
        sticky = "header:X-User"
        """
    )
    r = Router(cfg.routes).compiled[0]
    def pick(ip: str, user: str) -> str:
        return r.cluster_for(ip, [(b"x-user", user.encode())])

    by_user = {u: pick("10.0.0.1", u) for u in map(str, range(200))}
    assert set(by_user.values()) == {"a", "b"}
    assert all(pick("10.9.9.9", u) == c for u, c in by_user.items())
    by_ip = {ip: r.cluster_for(ip, []) for ip in (f"10.0.0.{i}" for i in range(200))}
    assert set(by_ip.values()) == {"a", "b"}


# --- rate limiting ----------------------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    rl = RateLimiter(requests=10, per=1.0, burst=5)
    now = 100.0
    assert [rl.allow("a", now) for _ in range(5)] == [0.0] * 5
    wait = rl.allow("a", now)
    assert wait == pytest.approx(0.1)
    assert rl.allow("b", now) == 0.0  # another client is unaffected
    assert rl.allow("a", now + 0.1) == 0.0  # one token back after 1/rate
    assert rl.allow("a", now + 0.1) > 0
    assert rl.allow("a", now + 10) == 0.0  # refilled, capped at the burst
    assert [rl.allow("a", now + 10) for _ in range(4)] == [0.0] * 4
    assert rl.allow("a", now + 10) > 0
    assert rl.rejected == 3


def test_rate_limiter_memory_is_capped() -> None:
    rl = RateLimiter(requests=1, per=60.0, burst=1, max_keys=100)
    for i in range(10_000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(rl.buckets) == 100
    # the most recent clients are the ones remembered
    assert rl.allow("10.0.39.15", 0.0) > 0


# --- config checks ----------------------------------------------------------------------

BASE = """
[[listeners]]
name = "e"
listen = "127.0.0.1:0"
[[clusters]]
name = "app"
backends = ["127.0.0.1:1"]
"""


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("", "routes[0]: needs exactly one of cluster, clusters, redirect or respond"),
        ('cluster = "app"\nrespond = { status = 204 }', "routes[0]: needs exactly one of"),
        ('cluster = "nope"', "routes[0].cluster: no cluster named 'nope'"),
        ('clusters = [{ name = "x" }]', "routes[0].clusters[0].name: no cluster named 'x'"),
        ('clusters = [{ name = "app", weight = 0 }]', "routes[0].clusters: the weights must"),
        ('cluster = "app"\nsticky = "client_ip"', "routes[0].sticky: only applies to weighted"),
        ('clusters = [{ name = "app" }]\nsticky = "cookie:x"', "routes[0].sticky: use 'client_ip'"),
        ('cluster = "app"\npath_regex = "(["', "routes[0].path_regex: not a valid regular"),
        ('cluster = "app"\nheaders = { a = "~(" }', "routes[0].headers.a: not a valid regular"),
        ('cluster = "app"\nmethods = ["get"]', "routes[0].methods: bad method 'get'"),
        ('cluster = "app"\nstrip_prefix = "api"', "routes[0].strip_prefix: must start with '/'"),
        ('cluster = "app"\nstrip_prefix = "/a"\nprefix_rewrite = "/b"', "routes[0].prefix_rewrite"),
        ('cluster = "app"\nprefix_rewrite = "/a b"', "routes[0].prefix_rewrite: may hold only"),
        ('cluster = "app"\nhost_rewrite = "a_b!"', "routes[0].host_rewrite: bad host"),
        (
            'cluster = "app"\nrequest_headers = { set = { Host = "x" } }',
            "routes[0].request_headers.set: 'Host' is owned by the proxy",
        ),
        (
            'cluster = "app"\nresponse_headers = { remove = ["transfer-encoding"] }',
            "routes[0].response_headers.remove: 'transfer-encoding' is owned",
        ),
        (
            'cluster = "app"\nrequest_headers = { add = { x-a = "{nope}" } }',
            "routes[0].request_headers.add.x-a: unknown variable {nope}",
        ),
        ('redirect = { to = "https://{host}{path}", status = 200 }', "routes[0].redirect.status"),
        ('respond = { status = 99 }', "routes[0].respond.status: must be between 200 and 599"),
        ('cluster = "app"\nrate_limit = { requests = 0 }', "routes[0].rate_limit.requests"),
        ('cluster = "app"\nrate_limit = { requests = 5, per = "0s" }', "routes[0].rate_limit.per"),
        ('cluster = "app"\nmax_replays = -1', "routes[0].max_replays: cannot be negative"),
        ('cluster = "app"\nrequest_timeout = "0s"', "routes[0].request_timeout: must be more"),
    ],
)
def test_route_config_errors_name_the_key(route: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        loads(BASE + "[[routes]]\n" + route + "\n")
    assert str(exc.value).startswith(message), str(exc.value)


def test_every_route_key_is_accepted() -> None:
    cfg = loads(
        BASE
        + """
[[clusters]]
name = "canary"
backends = ["127.0.0.1:2"]
[[routes]]
name = "api"
host = "*.example.com"
path_prefix = "/api/"
path_regex = "/api/v[0-9]+/.*"
methods = ["GET", "POST"]
headers = { x-beta = "1", user-agent = "~.*curl.*" }
query = { v = "2" }
prefix_rewrite = "/"
host_rewrite = "api.internal"
request_headers.set = { x-team = "web" }
request_headers.add = { x-client = "{client_ip}" }
request_headers.remove = ["cookie"]
response_headers = { set = { x-served-by = "{route}" }, remove = ["server"] }
clusters = [{ name = "app", weight = 95 }, { name = "canary", weight = 5 }]
sticky = "header:x-user"
request_timeout = "2m"
max_body = "10MiB"
max_replays = 0
rate_limit = { requests = 100, per = "1s", burst = 50 }
[[routes]]
path_prefix = "/old"
redirect = { to = "https://{host}{path}", status = 301 }
[[routes]]
path_exact = "/ping"
respond = { status = 204 }
"""
    )
    assert [r.name for r in Router(cfg.routes).compiled] == ["api", "routes[1]", "routes[2]"]
