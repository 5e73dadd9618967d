"""A client that goes away, and a client that cancels: running and queued tasks."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import SettingsFactory
from tests.integration.wire import (
    LONG_SEED,
    assert_sequenced,
    comparable,
    config,
    events,
    kinds,
    nth_token,
    rest,
    serve,
    sse_frames,
    take_until,
    tokens,
)
from tests.support import pool

pytestmark = [pytest.mark.wire]

SLOW = {"ttft_ms": 1, "tokens_per_s": 20}


@pytest.mark.req("ORCH-DATA-0057")
async def test_a_client_disconnecting_does_not_cancel_the_task(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for(config(pool(mock=SLOW)))) as wire:
        task_id = await wire.submit(max_tokens=30, seed=LONG_SEED)
        # A client of its own, so closing it really closes the TCP connection mid-stream.
        async with (
            httpx.AsyncClient(base_url=wire.client.base_url, timeout=10) as reader,
            reader.stream("GET", f"/v1/tasks/{task_id}/stream") as response,
        ):
            head = await take_until(sse_frames(response), nth_token(2))
        # The disconnect happened mid-run (1.5 s of tokens, 2 seen).
        assert (await wire.task(task_id))["state"] == "running"

        task = await wire.wait_state(task_id, "succeeded", "failed", "canceled")
        frames = await wire.read_all(task_id)

    assert task["state"] == "succeeded"
    assert task["usage"]["tokens_out"] == 30
    assert kinds(frames) == ["started"] + ["token"] * 16 + ["metrics"] + ["token"] * 14 + ["end"]
    assert_sequenced(frames)
    assert events(frames)[-1].payload["finish_reason"] == "length"
    assert events(frames)[-1].payload["tokens_out"] == 30
    assert comparable(frames)[: len(head)] == comparable(head)


@pytest.mark.req("ORCH-DATA-0062", "ORCH-DATA-0060")
async def test_cancel_stops_a_running_task_and_its_stream_ends_canceled(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for(config(pool(mock=SLOW)))) as wire:
        task_id = await wire.submit(max_tokens=200, seed=LONG_SEED)
        async with wire.stream(task_id) as (_, live):
            head = await take_until(live, nth_token(2))
            canceled = await wire.cancel(task_id)
            tail = await rest(live)
        again = await wire.cancel(task_id)
        task = await wire.task(task_id)
        replay = await wire.read_all(task_id)
        unknown = await wire.cancel("t-never-submitted")

    assert canceled.status_code == 204, canceled.text
    assert again.status_code == 204, again.text
    frames = head + tail
    streamed = len(tokens(frames))
    assert kinds(frames) == ["started"] + ["token"] * streamed + ["end"]
    assert_sequenced(frames)
    end = events(frames)[-1].payload
    assert end["finish_reason"] == "canceled"
    # The engine was stopped: 200 tokens would take 10 s; a second's worth is plenty of slack
    # for the tokens already on the wire when the cancel arrived.
    assert 2 <= streamed < 20
    assert end["tokens_out"] == streamed
    assert task["state"] == "canceled"
    assert task["finish_reason"] == "canceled"
    assert task["usage"]["tokens_out"] == streamed
    # A second cancel changed nothing.
    assert comparable(replay) == comparable(frames)
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["code"] == "TASK_NOT_FOUND"


@pytest.mark.req("ORCH-DATA-0061", "ORCH-DATA-0060")
async def test_a_task_canceled_while_queued_is_never_dispatched(
    settings_for: SettingsFactory,
) -> None:
    one_slot = pool(replicas=1, slots_per_replica=1, mock=SLOW)
    async with serve(settings_for(config(one_slot))) as wire:
        blocker = await wire.submit(max_tokens=200, seed=LONG_SEED)
        await wire.wait_state(blocker, "running")
        queued = await wire.submit(max_tokens=3)
        behind = await wire.submit(max_tokens=3)
        assert (await wire.task(queued))["state"] == "queued"

        async with wire.stream(queued) as (_, live):
            canceled = await wire.cancel(queued)
            frames = await rest(live, timeout_s=5)
        again = await wire.cancel(queued)
        # The canceled task ended at once, not when a slot would have let it start: the
        # blocker still runs (200 tokens take 10 s), and the task behind moved up.
        assert (await wire.task(blocker))["state"] == "running"
        assert (await wire.task(behind))["queue_position"] == 0

        # Free the slot: the task behind runs; the canceled one, ahead of it in FIFO order,
        # was not started on the way.
        assert (await wire.cancel(blocker)).status_code == 204
        behind_frames = await wire.read_all(behind)
        task = await wire.task(queued)
        replay = await wire.read_all(queued)

    assert canceled.status_code == 204, canceled.text
    assert again.status_code == 204, again.text
    assert [(f.id, f.event) for f in events(frames)] == [(0, "end")]
    end = events(frames)[0].payload
    assert end["finish_reason"] == "canceled"
    assert end["tokens_out"] == 0
    assert kinds(behind_frames) == ["started"] + ["token"] * 3 + ["end"]
    assert task["state"] == "canceled"
    assert task["timings"]["started_ms"] is None
    assert task["replica_id"] is None
    assert comparable(replay) == comparable(frames)
