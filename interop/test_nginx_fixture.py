"""The nginx backend fixture on its own, spoken to directly over HTTP/2 (no muxproxy).

If these fail, the interop tests through muxproxy prove nothing; if these pass and those fail,
the difference is muxproxy.
"""

from __future__ import annotations

import hashlib
import random

import h2.errors
import pytest

from .h2direct import H2Direct
from .nginx import BIG_SIZE, HEADERS_FIELDS, SMALL_SIZE, Nginx


def connect(nginx: Nginx) -> H2Direct:
    return H2Direct(nginx.port, ca_file=nginx.ca_file)


def test_static_files(nginx: Nginx) -> None:
    with connect(nginx) as c:
        small = c.request("GET", "/small")
        big = c.request("GET", "/big")
        missing = c.request("GET", "/missing")
    assert (small.status, bytes(small.body)) == (200, nginx.small)
    assert len(nginx.small) == SMALL_SIZE
    assert big.status == 200
    assert len(big.body) == BIG_SIZE
    assert hashlib.sha256(big.body).digest() == hashlib.sha256(nginx.big).digest()
    assert missing.status == 404
    assert small.header("x-conn") == big.header("x-conn") == missing.header("x-conn")
    assert c.conn.remote_settings.max_concurrent_streams == 128


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "no-length"])
@pytest.mark.parametrize("size", [0, 1024, 100 * 1024, 1024 * 1024])
def test_echo(nginx: Nginx, size: int, content_length: bool) -> None:
    body = random.Random(size).randbytes(size)
    with connect(nginx) as c:
        r = c.request("POST", "/echo", body=body, content_length=content_length)
    assert r.status == 200
    assert len(r.body) == size
    assert bytes(r.body) == body


def test_headers_endpoint(nginx: Nginx) -> None:
    sent = [
        ("x-forwarded-for", "192.0.2.1"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "app.example:8080"),
        ("via", "1.1 test"),
    ]
    with connect(nginx) as c:
        r = c.request("GET", "/headers", headers=sent)
    assert r.status == 200
    seen = dict(zip(HEADERS_FIELDS, r.body.decode().split("|"), strict=True))
    assert seen == {
        **dict(sent),
        "host": "localhost",  # from :authority
        "http_host": "localhost",
        "server_protocol": "HTTP/2.0",
    }


@pytest.mark.parametrize("keepalive_requests", [100])
def test_goaway_after_keepalive_requests(nginx: Nginx) -> None:
    """nginx ends an h2 connection with GOAWAY(NO_ERROR) once it took keepalive_requests."""
    completed = 0
    with connect(nginx) as c:
        while c.goaway is None:
            r = c.request("GET", "/small")
            assert (r.status, bytes(r.body)) == (200, nginx.small)
            completed += 1
            assert completed <= nginx.keepalive_requests
        goaway = c.goaway
    assert completed == nginx.keepalive_requests == 100
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == 2 * completed - 1  # the 100th client stream was processed


def test_connection_counting(nginx: Nginx) -> None:
    """stub_status counts accepted TCP connections; X-Conn tells them apart."""
    seen = set()
    for _ in range(3):
        with connect(nginx) as c:
            for _ in range(5):
                seen.add(c.request("GET", "/small").header("x-conn"))
    assert len(seen) == 3
    assert nginx.accepted_backend_connections() == 3
    assert nginx.accepted_backend_connections() == 3  # status reads are not counted
