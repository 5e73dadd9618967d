"""Engine adapters behind one Protocol (``base.Engine``); ``mock`` is the embedded default."""

from __future__ import annotations

from llorch.config import PoolSettings
from llorch.engines.base import Engine
from llorch.engines.mock import MockEngine


def build_engines(pool: PoolSettings) -> list[Engine]:
    """One engine object per configured replica of ``pool``."""
    return [
        MockEngine(
            f"{pool.id}-{i}",
            settings=pool.mock,
            slots=pool.slots_per_replica,
            failure=pool.mock.failure if pool.mock.failure.applies_to(i) else None,
        )
        for i in range(pool.replicas)
    ]
