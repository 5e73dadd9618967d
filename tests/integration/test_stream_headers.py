"""What a stream says before its first frame: budget headers and the correlation id."""

from __future__ import annotations

import pytest

from tests.conftest import SettingsFactory
from tests.integration.wire import LONG_SEED, config, events, rest, serve, take_until
from tests.support import pool, task_body

pytestmark = [pytest.mark.wire]

BUDGET_HEADERS = (
    "X-Budget-Tokens-Remaining",
    "X-Budget-Time-Remaining-Ms",
    "X-Budget-Cost-Remaining",
)


@pytest.mark.req("ORCH-DATA-0055")
async def test_budget_headers_come_with_the_start_of_the_stream(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config(pool(mock={"ttft_ms": 1, "tokens_per_s": 20})))
    async with serve(settings) as wire:
        accepted = await wire.client.post(
            "/v1/tasks", json=task_body(max_tokens=100, seed=LONG_SEED)
        )
        assert accepted.status_code == 202, accepted.text
        task_id, session_id = accepted.json()["task_id"], accepted.json()["session_id"]

        async with wire.stream(task_id) as (response, frames):
            # The headers are here before the task ends (5 s of tokens): they were sent when the
            # stream started, not with its end. (It may not have started yet: a task starts when
            # its engine accepts it.)
            assert (await wire.task(task_id))["state"] in ("queued", "running")
            session = (await wire.client.get(f"/v1/sessions/{session_id}")).json()
            await wire.cancel(task_id)
            await rest(frames)

    budgets = session["budgets"]
    # While the task runs, the session's remainder is its balance minus this task's
    # reservation: the same as the 202 announced.
    for name in BUDGET_HEADERS:
        assert response.headers[name] == accepted.headers[name], name
    assert int(response.headers["X-Budget-Tokens-Remaining"]) == budgets["tokens_remaining"]
    assert int(response.headers["X-Budget-Time-Remaining-Ms"]) == budgets["time_ms_remaining"]
    assert float(response.headers["X-Budget-Cost-Remaining"]) == pytest.approx(
        budgets["cost_remaining"]
    )
    # The reservation (prompt estimate + max_tokens) is taken from the default 200,000 tokens.
    assert int(response.headers["X-Budget-Tokens-Remaining"]) <= 200_000 - 100


@pytest.mark.req("ORCH-DATA-0002", "ORCH-DATA-0056")
async def test_the_correlation_id_is_echoed_and_reaches_the_started_event(
    settings_for: SettingsFactory,
) -> None:
    submitted_with = "wire-post-0001"
    async with serve(settings_for(config(pool()))) as wire:
        accepted = await wire.client.post(
            "/v1/tasks",
            json=task_body(max_tokens=3),
            headers={"X-Correlation-Id": submitted_with},
        )
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["X-Correlation-Id"] == submitted_with
        task_id = accepted.json()["task_id"]

        async with wire.stream(task_id, {"X-Correlation-Id": "wire-stream-0002"}) as (
            echoed,
            frames,
        ):
            started = await take_until(frames, lambda f: f.event is not None)
            await rest(frames)
        async with wire.stream(task_id) as (generated, frames):
            await rest(frames)
        async with wire.stream(task_id, {"X-Correlation-Id": "x" * 129}) as (too_long, frames):
            await rest(frames)

    assert echoed.headers["X-Correlation-Id"] == "wire-stream-0002"
    # The started event carries the id of the request that submitted the task.
    [first] = events(started)
    assert first.event == "started"
    assert first.payload["correlation_id"] == submitted_with
    assert first.payload["pool_id"] == "default"
    assert first.payload["replica_id"] == "default-0"
    assert first.payload["engine"] == "mock"
    assert first.payload["queue_position"] == 0
    assert first.payload["kv_warmth"] is False
    for response in (generated, too_long):
        cid = response.headers["X-Correlation-Id"]
        assert cid and len(cid) <= 128, cid
        assert cid not in (submitted_with, "wire-stream-0002")
    assert generated.headers["X-Correlation-Id"] != too_long.headers["X-Correlation-Id"]
