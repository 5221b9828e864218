"""Differential test: every corpus request sent to muxproxy and to nginx as a reverse proxy.

nginx runs with its defaults as an HTTP/1.1 reverse proxy in front of a recording backend
(``nginx_front.py``); muxproxy runs in-process in front of an HTTP/2 origin.  muxproxy must
refuse every corpus request with the status its file name gives and forward nothing.  Where
nginx does something else (forwards it, or refuses with another status), the difference is
recorded, and the record must equal ``NGINX_DIFFERS`` below, so that a change on either side
shows up here.  README.md ("Security") explains each difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from anyio.from_thread import start_blocking_portal

from muxproxy.demo.h2server import OriginRequest
from tests.corpus import Case, load
from tests.corpus.te_matrix import BODY, matrix
from tests.integration.harness import Harness, running

from .nginx_front import exchange, run_front

# What nginx 1.22 does where it does not refuse with muxproxy's status.  "forwarded": the
# request reached nginx's backend (then the status nginx answered).
NGINX_DIFFERS = {
    # RFC 9112 §2.2 lets a recipient accept a bare LF as a line end; nginx does, everywhere.
    "400-bare-lf-empty-line-first": "forwarded, 200",
    "400-bare-lf-end-of-head": "forwarded, 200",
    "400-bare-lf-everywhere": "forwarded, 200",
    "400-bare-lf-one-field.cve-2022-32214": "forwarded, 200",
    "400-bare-lf-request-line": "forwarded, 200",
    "400-chunk-data-bare-lf-end": "forwarded, 200",
    "400-chunk-size-bare-lf": "forwarded, 200",
    # Chunk lines: nginx reads any number of hex digits (until overflow) and treats anything
    # after the size up to the line end as an extension.
    "400-chunk-size-17-hex-digits": "forwarded, 200",
    "400-chunk-size-trailing-garbage": "forwarded, 200",
    "400-chunk-ext-control-character": "forwarded, 200",
    "400-chunk-ext-too-long.cve-2024-21647": "forwarded, 200",
    # nginx reads the whole chunked body, drops its trailer section unparsed, and forwards
    # the body with Content-Length.
    "400-trailer-bad-name": "forwarded, 200",
    "400-trailer-bare-lf": "forwarded, 200",
    "400-trailer-control-character": "forwarded, 200",
    "400-trailer-obs-fold": "forwarded, 200",
    "400-trailer-section-bare-lf-end": "forwarded, 200",
    # Control characters other than NUL, CR, LF: forwarded verbatim in a field value.
    "400-ctl-del-in-value": "forwarded, 200",
    "400-ctl-esc-in-value": "forwarded, 200",
    "400-ctl-ff-in-value": "forwarded, 200",
    "400-ctl-vt-in-value": "forwarded, 200",
    "400-ctl-x01-in-value": "forwarded, 200",
    "400-ctl-x1f-in-value": "forwarded, 200",
    # Field names outside token, or with "_": nginx drops the field (ignore_invalid_headers,
    # underscores_in_headers off) and forwards the rest.
    "400-name-at-sign": "forwarded, 200",
    "400-name-non-ascii": "forwarded, 200",
    "400-name-slash": "forwarded, 200",
    "400-name-underscore": "forwarded, 200",
    "400-cl-underscore-name": "forwarded, 200",
    "400-te-underscore-name": "forwarded, 200",
    # The request line: extra spaces, a fragment, non-ASCII, odd versions, HTTP/0.9.
    "400-double-space-request-line": "forwarded, 200",
    "400-trailing-space-request-line": "forwarded, 200",
    "400-fragment-in-target": "forwarded, 200",
    "400-non-ascii-in-target": "forwarded, 200",
    "400-two-digit-minor-version": "forwarded, 200",
    "505-http-1.2": "forwarded, 200",
    "400-http09-request-line": "forwarded, HTTP/0.9 answer",
    "400-too-many-empty-lines-first": "forwarded, 200",
    # Absolute-form: nginx takes the target's authority (RFC 9112 §3.2.2) whatever Host
    # says, and accepts any scheme.
    "400-absolute-form-host-mismatch": "forwarded, 200",
    "400-absolute-form-ftp": "forwarded, 200",
    "400-host-userinfo": "forwarded, 200",
    # nginx has no limit on the number of fields.
    "431-too-many-fields": "forwarded, 200",
    # Refused by both, with another status.
    "400-te-vertical-tab-prefix": "501",
    "413-chunk-size-over-max-body": "400",
    "413-cl-over-max-body": "400",
    "431-head-too-large-many-fields": "400",
    "431-head-too-large-one-field": "400",
    "501-connect": "400",
    "501-te-cow-then-chunked-fields": "400",
    "501-te-two-fields": "400",
    "505-h2-preface": "400",
}
DEADLINE = 10.0


class Recorder:
    """muxproxy's origin: records each request, reads its body, answers 200."""

    def __init__(self) -> None:
        self.requests: list[OriginRequest] = []

    async def __call__(self, req: OriginRequest) -> None:
        self.requests.append(req)
        await req.read_body()
        if req.reset_by_peer is None:
            await req.respond(200, [], b"origin\n")

    def none_complete(self) -> bool:
        return all(r.reset_by_peer is not None and not r.body_complete for r in self.requests)


@contextmanager
def muxproxy_in_process(routes: str | None = None) -> Iterator[tuple[Harness, Recorder]]:
    rec = Recorder()
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(running(rec, routes=routes)) as h,
    ):
        yield h, rec


def describe(status: int | None, forwarded: bool, out: bytes) -> str:
    what = str(status) if status is not None else "HTTP/0.9 answer" if out else "closed"
    return f"forwarded, {what}" if forwarded else what


def wait_until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)  # polling a condition across threads, bounded by the deadline


def muxproxy_refuses(h: Harness, rec: Recorder, case: Case) -> None:
    before = h.origin.requests_received
    status, out = exchange(h.addr.port, case.raw)
    assert status == case.status, (case.name, out[:200])
    assert b"connection: close" in out.split(b"\r\n\r\n", 1)[0].lower(), case.name
    # Nothing complete reached the origin (a head forwarded before its body went bad is
    # reset there; test_hardening covers which is which).
    wait_until(rec.none_complete)
    assert h.origin.requests_received - before <= 1


def test_corpus_against_nginx_as_reverse_proxy(tmp_path: Path) -> None:
    cases = load()
    differs: dict[str, str] = {}
    with run_front(tmp_path / "nginx") as nginx, muxproxy_in_process() as (h, rec):
        for case in cases:
            muxproxy_refuses(h, rec, case)
            before = len(nginx.backend.heads)
            status, out = exchange(nginx.port, case.raw)
            got = describe(status, len(nginx.backend.heads) > before, out)
            if got != str(case.status):
                differs[case.name] = got
    unexpected = {k: v for k, v in differs.items() if NGINX_DIFFERS.get(k) != v}
    gone = {k: v for k, v in NGINX_DIFFERS.items() if k not in differs}
    assert not unexpected and not gone, f"new or changed: {unexpected}; no longer: {gone}"
    forwarded = [k for k, v in differs.items() if v.startswith("forwarded")]
    assert len(forwarded) == 40  # the number README.md quotes


def test_te_mutation_matrix_against_nginx(tmp_path: Path) -> None:
    """The exhaustive Transfer-Encoding matrix (1520 requests) through nginx.  muxproxy
    forwards 10 of them, each framed by Content-Length exactly as a strict parser frames it
    (tests/unit, tests/integration).  nginx forwards 542, all framed by Content-Length too,
    except two where a bare LF before "Transfer-Encoding" ends nginx's head early: nginx
    forwards "Transf" as the body and reads the rest as a second request."""
    forwarded, framed_otherwise = [], []
    with run_front(tmp_path / "nginx") as nginx:
        for name, raw in matrix():
            before = len(nginx.backend.heads)
            exchange(nginx.port, raw)
            if len(nginx.backend.heads) > before:
                forwarded.append(name)
                if nginx.backend.bodies[before] != BODY:
                    framed_otherwise.append(name)
    assert len(forwarded) == 542
    assert sorted(framed_otherwise) == ["prespace-0a-last", "xnprespace-0a-last"]


# Paths (issue 16 item 7): target → (muxproxy: status, path its backend received),
# (nginx: status, the path it routed on, its $uri).  muxproxy normalises per RFC 3986 §6.2.2 and
# forwards what it routed; nginx routes on its normalised $uri but forwards the target as sent
# (proxy_pass without a URI), so its backend may act on another path than the one routed.
# Intended differences, each in README "Paths":
# - a ".." above the root: nginx 400; muxproxy drops it, as RFC 3986 §5.2.4 / §5.4.2 do;
# - %2F and %5C: nginx decodes them for routing (and forwards them raw); muxproxy refuses them
#   by default (escaped_slashes = "reject"; "keep" and "decode" are the alternatives);
# - escapes of reserved or non-ASCII characters: nginx's $uri decodes every escape, muxproxy
#   keeps them escaped (upper-case hex, RFC 3986 §6.2.2.1) — the same path for routing.
PATH_CASES: list[tuple[bytes, tuple[int, bytes | None], tuple[int, bytes | None]]] = [
    (b"/a/../b", (200, b"/b"), (200, b"/b")),
    (b"/a/./b", (200, b"/a/b"), (200, b"/a/b")),
    (b"/a/%2e%2e/b", (200, b"/b"), (200, b"/b")),
    (b"/a/b/..", (200, b"/a/"), (200, b"/a/")),
    (b"//a//b", (200, b"/a/b"), (200, b"/a/b")),
    (b"/%7Euser", (200, b"/~user"), (200, b"/~user")),
    (b"/%41bc", (200, b"/Abc"), (200, b"/Abc")),
    (b"/a?x=/../y", (200, b"/a?x=/../y"), (200, b"/a")),
    (b"/%zz", (400, None), (400, None)),
    (b"/../b", (200, b"/b"), (400, None)),
    (b"/a/b/../../../c", (200, b"/c"), (400, None)),
    (b"/a%2fb", (400, None), (200, b"/a/b")),
    (b"/a%2Fb", (400, None), (200, b"/a/b")),
    (b"/a/..%2fb", (400, None), (200, b"/b")),
    (b"/a%5cb", (400, None), (200, b"/a\\b")),
    (b"/a%20b", (200, b"/a%20b"), (200, b"/a b")),
    (b"/%3a", (200, b"/%3A"), (200, b"/:")),
]


def test_paths_against_nginx(tmp_path: Path) -> None:
    got_mux, got_nginx = [], []
    with run_front(tmp_path / "nginx") as nginx, muxproxy_in_process() as (h, rec):
        for target, _, _ in PATH_CASES:
            raw = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            before = len(rec.requests)
            status, _ = exchange(h.addr.port, raw)
            path = rec.requests[-1].path if len(rec.requests) > before else None
            got_mux.append((status, path))
            before = len(nginx.backend.heads)
            status, _ = exchange(nginx.port, raw)
            uri = None
            if len(nginx.backend.heads) > before:
                head = nginx.backend.heads[-1]
                assert head.startswith(b"GET " + target + b" ")  # forwarded as sent
                uri = next(
                    line.split(b":", 1)[1].strip()
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"x-nginx-uri:")
                )
            got_nginx.append((status, uri))
    assert got_mux == [m for _, m, _ in PATH_CASES]
    assert got_nginx == [n for _, _, n in PATH_CASES]


# The muxproxy routes equivalent to nginx_front's `location /api/` (proxy_pass with a URI,
# proxy_set_header) and `location = /old` (return 308).
REWRITE_ROUTES = """
[[routes]]
path_prefix = "/api/"
prefix_rewrite = "/"
request_headers.set = { x-team = "web" }
cluster = "app"
[[routes]]
path_exact = "/old"
redirect = { to = "https://{host}{path}", status = 308 }
[[routes]]
cluster = "app"
"""
REWRITE_CASES = [b"/api/users?x=1", b"/api/", b"/api/a/b/../c", b"/old?q=1", b"/other"]


def test_rewrites_against_nginx(tmp_path: Path) -> None:
    """Strip a prefix, add a header, redirect: the backend sees the same path and field,
    the client the same status and Location, from muxproxy and from nginx."""
    got_mux, got_nginx = [], []
    with (
        run_front(tmp_path / "nginx") as nginx,
        muxproxy_in_process(REWRITE_ROUTES) as (h, rec),
    ):
        for target in REWRITE_CASES:
            raw = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            before = len(rec.requests)
            status, out = exchange(h.addr.port, raw)
            seen = None
            if len(rec.requests) > before:
                req = rec.requests[-1]
                seen = (req.path, req.header(b"x-team"))
            got_mux.append((status, seen, _location(out)))
            before = len(nginx.backend.heads)
            status, out = exchange(nginx.port, raw)
            seen = None
            if len(nginx.backend.heads) > before:
                line, *fields = nginx.backend.heads[-1].split(b"\r\n")
                teams = [f for f in fields if f.lower().startswith(b"x-team:")]
                team = teams[0].split(b":", 1)[1].strip() if teams else None
                seen = (line.split(b" ")[1], team)
            got_nginx.append((status, seen, _location(out)))
    assert got_mux == got_nginx
    assert got_mux[0] == (200, (b"/users?x=1", b"web"), None)
    assert got_mux[3] == (308, None, b"https://a.test/old?q=1")


def _location(out: bytes) -> bytes | None:
    head = out.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"location:"):
            return line.split(b":", 1)[1].strip()
    return None
