"""Policy drop-lru on the wire: the dropped task's stream, and the newcomer that cannot fit."""

from __future__ import annotations

import pytest

from tests.conftest import SettingsFactory
from tests.integration.wire import LONG_SEED, config, events, rest, serve
from tests.support import pool, task_body

pytestmark = [pytest.mark.wire]


@pytest.mark.req("ORCH-DATA-0022", "ORCH-DATA-0023", "ORCH-DATA-0020")
async def test_drop_lru_drops_the_oldest_lower_priority_task(
    settings_for: SettingsFactory,
) -> None:
    one_slot = pool(
        replicas=1,
        slots_per_replica=1,
        mock={"ttft_ms": 1, "tokens_per_s": 20},
        queue={"capacity": 2, "policy": "drop-lru"},
    )
    async with serve(settings_for(config(one_slot))) as wire:
        blocker = await wire.submit(max_tokens=200, seed=LONG_SEED)
        await wire.wait_state(blocker, "running")
        oldest_batch = await wire.submit(priority="batch")
        newer_batch = await wire.submit(priority="batch")

        async with wire.stream(oldest_batch) as (_, dropped_stream):
            interactive = await wire.client.post(
                "/v1/tasks", json=task_body(priority="interactive")
            )
            dropped_frames = await rest(dropped_stream)
        dropped = await wire.task(oldest_batch)
        kept = await wire.task(newer_batch)
        first = await wire.task(interactive.json()["task_id"])

        # Lower priority goes first: a second interactive newcomer drops the remaining batch
        # task, although the first interactive task is older.
        second = await wire.client.post("/v1/tasks", json=task_body(priority="interactive"))
        kept_after = await wire.task(newer_batch)
        # Now only interactive tasks are queued: a batch newcomer has nothing to displace.
        refused = await wire.client.post("/v1/tasks", json=task_body(priority="batch"))

        for task_id in (blocker, first["task_id"], second.json()["task_id"]):
            assert (await wire.cancel(task_id)).status_code == 204

    assert interactive.status_code == 202, interactive.text
    assert interactive.json()["queue_position"] == 0
    [error] = events(dropped_frames)
    assert (error.id, error.event) == (0, "error")
    assert error.payload["code"] == "QUEUE_FULL_DROP_LRU"
    assert error.payload["retriable"] is True
    assert dropped["state"] == "failed"
    assert dropped["error"]["code"] == "QUEUE_FULL_DROP_LRU"
    assert dropped["timings"]["started_ms"] is None
    assert (kept["state"], kept["queue_position"]) == ("queued", 1)
    assert (first["state"], first["queue_position"]) == ("queued", 0)

    assert second.status_code == 202, second.text
    assert kept_after["state"] == "failed"
    assert kept_after["error"]["code"] == "QUEUE_FULL_DROP_LRU"

    assert refused.status_code == 429, refused.text
    assert refused.json()["code"] == "QUEUE_FULL_DROP_LRU"
    assert int(refused.headers["Retry-After"]) >= 1
    assert int(refused.headers["X-Backoff-Ms"]) >= 0
