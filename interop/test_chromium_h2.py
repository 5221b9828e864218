"""A headless Chromium (Debian package ``chromium``) loads a page with 50 subresources through
a TLS listener of muxproxy: it negotiates h2 (ALPN) and gets all 50 over one connection."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from muxproxy.core.outcome import Outcome
from tests.integration.h2harness import running_h2

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
N = 50

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed"),
]

PAGE = (
    "<!doctype html><html><head><title>h2</title></head><body>"
    + "".join(f'<script src="/s/{i}.js"></script>' for i in range(N))
    + "<script>var h2 = performance.getEntriesByType('resource')"
    ".filter(function (e) { return e.nextHopProtocol === 'h2'; }).length;"
    "document.body.insertAdjacentHTML('beforeend', '<p id=r>loaded=' + window.loaded + "
    "' h2=' + h2 + ' nav=' + performance.getEntriesByType('navigation')[0].nextHopProtocol"
    " + '</p>');</script></body></html>"
).encode()


async def site(req: object) -> None:
    path = req.path.decode()  # type: ignore[attr-defined]
    if path == "/":
        await req.respond(200, [(b"content-type", b"text/html")], PAGE)  # type: ignore[attr-defined]
    elif path.startswith("/s/"):
        js = b"window.loaded = (window.loaded || 0) + 1; // " + b"x" * 2000
        await req.respond(  # type: ignore[attr-defined]
            200, [(b"content-type", b"application/javascript")], js
        )
    else:
        await req.respond(404, [], b"")  # type: ignore[attr-defined]


async def test_chromium_loads_50_subresources_over_h2(tmp_path: Path) -> None:
    async with running_h2(site, tls_dir=tmp_path) as h:
        seen: list[Outcome] = []
        h.proxy.recorders.append(seen.append)
        assert CHROMIUM is not None
        cmd = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
            "--dump-dom", f"{h.url}/",
        ]
        r = await anyio.run_process(cmd, check=False, stderr=subprocess.DEVNULL)
        dom = r.stdout.decode()
        assert f"loaded={N} h2={N} nav=h2" in dom, dom[-500:]
        got = [o for o in seen if o.path.startswith("/s/")]
        assert len(got) == N and all(o.protocol == "HTTP/2" and o.status == 200 for o in got)
