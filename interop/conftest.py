"""Fixtures: a real nginx backend (h2c or TLS h2) and muxproxy in front of it, per test.

``keepalive_requests`` is a fixture so that a test can override it by direct parametrisation,
e.g. ``@pytest.mark.parametrize("keepalive_requests", [100])`` to make nginx send GOAWAY often.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .nginx import Nginx, Protocol, run_nginx
from .proxy import Proxy, run_proxy


@pytest.fixture
def keepalive_requests() -> int:
    return 1000


@pytest.fixture(params=["h2c", "h2"])
def backend_protocol(request: pytest.FixtureRequest) -> Protocol:
    protocol: Protocol = request.param
    return protocol


@pytest.fixture
def nginx(tmp_path: Path, backend_protocol: Protocol, keepalive_requests: int) -> Iterator[Nginx]:
    with run_nginx(
        tmp_path / "nginx", protocol=backend_protocol, keepalive_requests=keepalive_requests
    ) as server:
        yield server


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(tmp_path: Path, nginx: Nginx, loop: str) -> Iterator[Proxy]:
    with run_proxy(tmp_path / "muxproxy", nginx, loop) as running:
        yield running
