"""The cyclic collector's set-up once the server has started (llorch.__main__.tune_collector)."""

from __future__ import annotations

import gc

from llorch.__main__ import GC_THRESHOLDS, tune_collector


def test_start_up_objects_are_frozen_and_the_young_generation_collects_less_often() -> None:
    before = gc.get_threshold()
    held = [{"start-up": n} for n in range(100)]  # what start-up built, still referenced
    try:
        tune_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() >= len(held)
        # No collection walks them again: they are in none of its generations.
        walked = {id(item) for item in gc.get_objects()}
        assert not any(id(item) in walked for item in held)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
