"""The collector tuning applied once the proxy is ready (cli.settle_heap)."""

from __future__ import annotations

import gc

from muxproxy.cli import GC_GEN0_THRESHOLD, settle_heap


def test_settle_heap_freezes_startup_objects_and_raises_gen0_threshold() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0  # what existed at startup is out of the collector's sight
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
