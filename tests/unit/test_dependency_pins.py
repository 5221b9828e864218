"""The private internals of dependencies muxproxy relies on, checked against the installed
versions: an upgrade past the pins in pyproject.toml fails here, loudly, rather than in
production.  Each check names the module that uses the internal."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import h2.connection
import h11
import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.stream import QuicStream

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _pins() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([a-z0-9]+)>=([\d.]+),<([\d.]+)", dep)
        if m:
            low, high = (tuple(int(p) for p in v.split(".")) for v in m.group(2, 3))
            out[m.group(1)] = (low, high)
    return out


@pytest.mark.parametrize("name", ["h11", "h2", "aioquic"])
def test_installed_version_is_within_the_pin(name: str) -> None:
    low, high = _pins()[name]
    installed = tuple(int(p) for p in re.findall(r"\d+", version(name))[:3])
    assert low <= installed < high, f"{name} {version(name)} is outside the tested range"


def test_h11_state_internals() -> None:  # core/frontend_h11.py
    assert h11._state.MIGHT_SWITCH_PROTOCOL is not None


def test_aioquic_internals() -> None:  # core/backend_h3.py
    from aioquic._buffer import Buffer, BufferReadError  # noqa: F401

    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    assert isinstance(quic._remote_max_streams_bidi, int)
    assert isinstance(quic._streams, dict)
    sender = QuicStream(stream_id=0).sender
    assert isinstance(sender._buffer_stop, int) and isinstance(sender.highest_offset, int)


def test_h2_state_machine_table() -> None:  # demo/h2server.py
    assert isinstance(h2.connection.H2ConnectionStateMachine._transitions, dict)
