"""The atheris target, run briefly: a few thousand inputs seeded by the corpus.

Longer runs are by hand (see ``fuzz_head.py``).  The run is seeded (``-seed``) so that CI is
reproducible; libFuzzer exits non-zero, and saves the input, at the first violation.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.corpus import DIR

REPO = DIR.parent.parent
RUNS = 2000


def test_atheris_target_holds_the_invariant_briefly(tmp_path: Path) -> None:
    seeds, found, artifacts = tmp_path / "seeds", tmp_path / "found", tmp_path / "artifacts"
    for d in (seeds, found, artifacts):
        d.mkdir()
    for f in DIR.glob("*.http"):
        shutil.copy(f, seeds)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_head",
            str(found),
            str(seeds),
            f"-runs={RUNS}",
            "-seed=20240601",
            f"-artifact_prefix={artifacts}/",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    assert "Done" in log and not list(artifacts.iterdir()), log[-4000:]


def test_h2_differential_target_briefly(tmp_path: Path) -> None:
    """``fuzz_h2diff``: muxproxy's HTTP/2 client codec and h2's agree on 2000 inputs, or
    differ only as ``tests/fuzz/h2diff.py`` documents."""
    found, artifacts = tmp_path / "found", tmp_path / "artifacts"
    for d in (found, artifacts):
        d.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_h2diff",
            str(found),
            f"-runs={RUNS}",
            "-seed=20261204",
            f"-artifact_prefix={artifacts}/",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    log = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    assert "Done" in log and not list(artifacts.iterdir()), log[-4000:]
