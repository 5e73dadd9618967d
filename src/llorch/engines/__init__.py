"""Engine adapters behind one Protocol (``base.Engine``); ``mock`` is the embedded default,
``openai_http`` speaks to llama.cpp server, vLLM, TGI and other OpenAI-compatible engines."""

from __future__ import annotations

from llorch.config import HTTP_ENGINES, FailureSettings, PoolSettings
from llorch.engines.base import Engine
from llorch.engines.mock import MockEngine
from llorch.engines.openai_http import OpenAIHttpEngine


def build_engines(pool: PoolSettings, generation: int = 0) -> list[Engine]:
    """One engine object per configured replica of ``pool``, serving ``pool.model``.

    ``generation`` counts reloads; replicas of a reloaded pool get new ids.
    """
    prefix = pool.id if generation == 0 else f"{pool.id}-r{generation}"
    if pool.engine in HTTP_ENGINES:
        return [
            OpenAIHttpEngine.for_pool(f"{prefix}-{i}", url, pool)
            for i, url in enumerate(pool.endpoints)
        ]
    cannot_load = FailureSettings(mode="down")
    engines: list[Engine] = []
    for i in range(pool.replicas):
        failure = pool.mock.failure if pool.mock.failure.applies_to(i) else None
        if pool.model in pool.mock.fail_load_models:
            failure = cannot_load
        engines.append(
            MockEngine(
                f"{prefix}-{i}", settings=pool.mock, slots=pool.slots_per_replica, failure=failure
            )
        )
    return engines
