"""The serving process's cyclic-collector settings (``llorch.__main__.tune_collector``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from llorch.__main__ import GC_THRESHOLDS, tune_collector


@pytest.fixture
def collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector")
def test_serving_freezes_what_start_up_built_and_raises_the_collector_thresholds() -> None:
    built = [[object()] for _ in range(1000)]  # live containers, as start-up leaves them

    tune_collector()

    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() >= len(built)


@pytest.mark.usefixtures("collector")
def test_cycles_made_while_serving_are_still_collected() -> None:
    tune_collector()
    freed: list[str] = []

    class Node:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            freed.append("node")

    Node()  # garbage: unreachable, but alive through its own cycle

    gc.collect()
    assert freed == ["node"]
