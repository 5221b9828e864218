"""Every async test runs on each event loop muxproxy supports: asyncio, uvloop and trio."""

from __future__ import annotations

from typing import Any

import pytest

UVLOOP = ("asyncio", {"use_uvloop": True})


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(UVLOOP, id="uvloop"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def loop_name(anyio_backend: Any) -> str:
    """``asyncio``, ``uvloop`` or ``trio`` for the ``anyio_backend`` fixture's value."""
    if anyio_backend == UVLOOP:
        return "uvloop"
    return str(anyio_backend)
