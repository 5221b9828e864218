"""HTTP/2 clients (issue 14): curl and nghttp through muxproxy, TLS ALPN h2 and h2c."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .h2harness import curl, running_h2
from .origin import Script, pattern

pytestmark = pytest.mark.anyio


async def test_curl_h2c_prior_knowledge() -> None:
    async with running_h2(Script()) as h:
        r = await curl(h, "/hello", "-w", "%{http_version} %{http_code}", "-o", "/dev/null")
        assert r.stdout == b"2 200", r.stderr
        r = await curl(h, "/big?300000")
        assert hashlib.sha256(r.stdout).digest() == hashlib.sha256(pattern(300000)).digest()


async def test_curl_h2_over_tls_alpn(tmp_path: Path) -> None:
    async with running_h2(Script(), tls_dir=tmp_path) as h:
        r = await curl(h, "/hello", "-w", " %{http_version}")
        assert r.stdout == b"hello\n 2", r.stderr
        body = tmp_path / "body"
        body.write_bytes(pattern(200_000))
        r = await curl(h, "/echo", "--data-binary", f"@{body}")
        assert r.stdout == pattern(200_000), r.stderr
