"""muxproxy/budget.py: the backend connection budget that `muxproxy check` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxproxy.budget import connection_budget
from muxproxy.cli import main
from muxproxy.config import loads


def config(cluster: str, workers: int = 1) -> str:
    return f"""
[proxy]
workers = {workers}
[[listeners]]
name = "edge"
listen = "127.0.0.1:8080"
[[clusters]]
name = "app"
{cluster}
[[routes]]
cluster = "app"
"""


def test_workers_times_backends_times_connections() -> None:
    lines = connection_budget(
        loads(config('backends = ["10.0.0.1:80", "10.0.0.2:80"]\nconnections = 4', workers=3))
    )
    assert "3 worker(s) × 4 connection(s) = 12 per backend; × 2 address(es) = 24" in lines[0]
    assert "≤ 12,000 concurrent streams per backend" in lines[0]
    assert lines[-1].startswith("budget: 24 backend connection(s) per instance (")


def test_max_connections_is_the_ceiling() -> None:
    text = config('backends = ["10.0.0.1:80"]\nconnections = 2\nmax_connections = 5', workers=2)
    lines = connection_budget(loads(text))
    assert "up to 10 with max_connections = 5; × 1 address(es) = 4 (ceiling 10)" in lines[0]
    assert lines[-1].startswith("budget: 4 backend connection(s) per instance, at most 10 (")


def test_a_dns_name_counts_per_resolved_address() -> None:
    lines = connection_budget(loads(config('backends = ["app.svc:8080"]\nconnections = 4')))
    assert "+ 4 per address that app.svc resolve(s) to" in lines[0]
    assert "plus those per resolved address" in lines[-1]


def test_muxproxy_check_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[2] / "conf" / "example.toml"
    assert main(["check", "-c", str(example)]) == 0
    assert "budget: 8 backend connection(s) per instance" in capsys.readouterr().out
