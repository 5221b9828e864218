"""core/paths.py: the normaliser held to RFC 3986's own examples, and the listener options."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxproxy.config import loads
from muxproxy.core.frontend_h11 import RequestHead
from muxproxy.core.paths import normalise_target, remove_dot_segments
from muxproxy.errors import ClientError, ConfigError
from muxproxy.router import Router

BASE_PATH = b"/b/c/d;p"  # RFC 3986 §5.4: base URI "http://a/b/c/d;p?q"

# §5.4.1 normal and §5.4.2 abnormal examples whose reference is a relative *path* (the only
# kind a request target's path can be): reference → resolved path.  Left out, because they
# are not paths: "g:h" (a scheme), "//g" (an authority), "?y", "#s", "g?y", "g#s", "g?y#s",
# "" (the base itself, with its query) and "http:g"; and "g?y/./x", "g?y/../x" (the dots are
# in the query, which is never touched: test_query_is_never_touched).
RFC3986_5_4 = [
    (b"g", b"/b/c/g"),
    (b"./g", b"/b/c/g"),
    (b"g/", b"/b/c/g/"),
    (b"/g", b"/g"),
    (b";x", b"/b/c/;x"),
    (b"g;x", b"/b/c/g;x"),
    (b".", b"/b/c/"),
    (b"./", b"/b/c/"),
    (b"..", b"/b/"),
    (b"../", b"/b/"),
    (b"../g", b"/b/g"),
    (b"../..", b"/"),
    (b"../../", b"/"),
    (b"../../g", b"/g"),
    # §5.4.2 abnormal
    (b"../../../g", b"/g"),
    (b"../../../../g", b"/g"),
    (b"/./g", b"/g"),
    (b"/../g", b"/g"),
    (b"g.", b"/b/c/g."),
    (b".g", b"/b/c/.g"),
    (b"g..", b"/b/c/g.."),
    (b"..g", b"/b/c/..g"),
    (b"./../g", b"/b/g"),
    (b"./g/.", b"/b/c/g/"),
    (b"g/./h", b"/b/c/g/h"),
    (b"g/../h", b"/b/c/h"),
    (b"g;x=1/./y", b"/b/c/g;x=1/y"),
    (b"g;x=1/../y", b"/b/c/y"),
]


def merge(base: bytes, ref: bytes) -> bytes:
    """RFC 3986 §5.2.3 for a path reference (the dot segments are left to the normaliser)."""
    return ref if ref.startswith(b"/") else base[: base.rfind(b"/") + 1] + ref


@pytest.mark.parametrize(("ref", "expected"), RFC3986_5_4, ids=lambda v: v.decode())
def test_rfc3986_section_5_4_examples(ref: bytes, expected: bytes) -> None:
    assert normalise_target(merge(BASE_PATH, ref)) == expected
    assert remove_dot_segments(merge(BASE_PATH, ref)) == expected


# §5.2.4's own walk-throughs, and §6.2.2's equivalences (the path parts of its URIs).
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a/b/c/./../../g", b"/a/g"),  # §5.2.4 (its other example is a relative path)
        (b"/./b/../b/%63/%7bfoo%7d", b"/b/c/%7Bfoo%7D"),  # §6.2.2: eXAMPLE://a/./b/../b/...
        (b"/b/c/%7Bfoo%7D", b"/b/c/%7Bfoo%7D"),
        (b"/%3a", b"/%3A"),  # §6.2.2.1: "%3a" is "%3A"
        (b"/%41%42%7e%5f%2D%2e", b"/AB~_-."),  # §6.2.2.2: unreserved escapes decoded
        (b"/%7Euser/%E2%82%AC", b"/~user/%E2%82%AC"),  # non-ASCII stays escaped
        (b"/a%20b", b"/a%20b"),  # reserved and others stay escaped
        (b"/%2e%2e/%2E%2E/etc", b"/etc"),  # decoded dots are dot segments (§6.2.2.3 order)
        (b"/public/%2e%2e/admin", b"/admin"),
        (b"/public/.%2e/admin", b"/admin"),
        (b"/", b"/"),
        (b"/.", b"/"),
        (b"/..", b"/"),
        (b"/a/..", b"/"),
        (b"/a/b/..", b"/a/"),
    ],
)
def test_rfc3986_section_6_2_2(path: bytes, expected: bytes) -> None:
    assert normalise_target(path) == expected


def test_query_is_never_touched() -> None:
    assert normalise_target(b"/a/../b?x=/../%2f%7e//") == b"/b?x=/../%2f%7e//"
    assert normalise_target(b"/g?y/./x") == b"/g?y/./x"


@pytest.mark.parametrize(
    ("path", "merge", "expected"),
    [
        (b"//a///b/", True, b"/a/b/"),
        (b"//a///b/", False, b"//a///b/"),
        (b"/a//../b", True, b"/b"),  # merged first, as nginx does
        (b"/a//../b", False, b"/a/b"),  # §5.2.4 on the empty segment
    ],
)
def test_merge_slashes(path: bytes, merge: bool, expected: bytes) -> None:
    assert normalise_target(path, merge_slashes=merge) == expected


@pytest.mark.parametrize("path", [b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a%5c..%5cb"])
def test_escaped_slashes(path: bytes) -> None:
    with pytest.raises(ClientError) as exc:
        normalise_target(path)
    assert exc.value.status_hint == 400
    kept = normalise_target(path, escaped_slashes="keep")
    assert b"%2F" in kept or b"%5C" in kept
    decoded = normalise_target(path, escaped_slashes="decode")
    assert b"%" not in decoded


def test_decoded_slashes_take_part_in_dot_removal() -> None:
    assert normalise_target(b"/public%2F..%2Fadmin", escaped_slashes="decode") == b"/admin"
    assert (
        normalise_target(b"/public%2F..%2Fadmin", escaped_slashes="keep")
        == b"/public%2F..%2Fadmin"
    )


@pytest.mark.parametrize("path", [b"/%", b"/%4", b"/%zz", b"/a%g0", b"/%%41"])
def test_malformed_escapes_are_400(path: bytes) -> None:
    with pytest.raises(ClientError) as exc:
        normalise_target(path, escaped_slashes="keep")
    assert exc.value.status_hint == 400


def test_common_targets_are_returned_as_they_are() -> None:
    t = b"/api/v1/items?id=3&x=%2F"
    assert normalise_target(t) is t


SEGMENT = st.sampled_from([b"a", b"b.c", b".", b"..", b"", b"%2e", b"%2E%2e", b"%7E", b"%41"])


@given(st.lists(SEGMENT, max_size=12), st.booleans())
def test_property_idempotent_rooted_and_dot_free(segs: list[bytes], merge_: bool) -> None:
    once = normalise_target(b"/" + b"/".join(segs), merge_slashes=merge_)
    assert once.startswith(b"/")
    assert normalise_target(once, merge_slashes=merge_) == once
    assert b"/./" not in once + b"/" and b"/../" not in once + b"/"


CONFIG = """
[[listeners]]
name = "edge"
listen = "127.0.0.1:0"
{extra}
[[clusters]]
name = "app"
backends = ["127.0.0.1:1"]
[[routes]]
host = "*"
path_prefix = "/public"
cluster = "app"
"""


def head(target: bytes) -> RequestHead:
    return RequestHead(b"GET", target, b"a.test", [], b"1.1", False, None, True, False)


def test_listener_defaults_and_router_routes_the_normalised_path() -> None:
    cfg = loads(CONFIG.format(extra=""))
    listener = cfg.listeners[0]
    assert listener.merge_slashes is True and listener.escaped_slashes == "reject"
    router = Router(cfg.routes)
    h = head(b"/public/../admin")
    assert router.route(h, listener) is None and h.target == b"/admin"  # no /public route
    h = head(b"/public/x/../y?q=/..")
    assert router.route(h, listener) is not None and h.target == b"/public/y?q=/.."
    h = head(b"/%70ublic//x")
    assert router.route(h, listener) is not None and h.target == b"/public/x"
    with pytest.raises(ClientError):
        router.route(head(b"/public%2F..%2Fadmin"), listener)
    star = RequestHead(b"OPTIONS", b"*", b"a.test", [], b"1.1", False, None, True, False)
    router.route(star, listener)
    assert star.target == b"*"


def test_listener_options_are_validated_with_their_key_path() -> None:
    cfg = loads(CONFIG.format(extra='merge_slashes = false\nescaped_slashes = "decode"'))
    assert cfg.listeners[0].merge_slashes is False
    assert cfg.listeners[0].escaped_slashes == "decode"
    with pytest.raises(ConfigError) as exc:
        loads(CONFIG.format(extra='escaped_slashes = "allow"'))
    assert "escaped_slashes" in str(exc.value)
