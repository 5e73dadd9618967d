"""Engine failures as a client sees them: one `error` frame, then the stream closes."""

from __future__ import annotations

import pytest

from tests.conftest import SettingsFactory
from tests.integration.wire import (
    assert_sequenced,
    config,
    events,
    kinds,
    serve,
    tokens,
)
from tests.support import pool

pytestmark = [pytest.mark.wire]


@pytest.mark.req("ORCH-DATA-0033", "ORCH-DATA-0050")
async def test_a_worker_reset_mid_stream_ends_the_stream_with_one_error(
    settings_for: SettingsFactory,
) -> None:
    failing = pool(
        mock={"ttft_ms": 1, "tokens_per_s": 0, "failure": {"mode": "mid_stream", "after_tokens": 3}}
    )
    async with serve(settings_for(config(failing))) as wire:
        task_id = await wire.submit(max_tokens=8)
        # read_all returns only when the server closes the stream: nothing follows the error.
        frames = await wire.read_all(task_id)
        task = await wire.task(task_id)

    assert kinds(frames) == ["started", "token", "token", "token", "error"]
    assert_sequenced(frames)
    error = events(frames)[-1].payload
    assert error["code"] == "WORKER_RESET"
    assert error["retriable"] is True
    assert error["message"]
    assert task["state"] == "failed"
    assert task["error"]["code"] == "WORKER_RESET"
    assert task["error"]["retriable"] is True
    assert task["usage"]["tokens_out"] == 3


@pytest.mark.req("ORCH-DATA-0033")
async def test_an_engine_error_before_the_first_token(settings_for: SettingsFactory) -> None:
    failing = pool(
        mock={"ttft_ms": 1, "tokens_per_s": 0, "failure": {"mode": "before_first_token"}}
    )
    async with serve(settings_for(config(failing))) as wire:
        task_id = await wire.submit(max_tokens=8)
        frames = await wire.read_all(task_id)
        task = await wire.task(task_id)

    assert kinds(frames) == ["started", "error"]
    assert events(frames)[-1].payload["code"] == "ENGINE_ERROR"
    assert events(frames)[-1].payload["retriable"] is True
    assert task["state"] == "failed"
    assert task["error"]["code"] == "ENGINE_ERROR"


@pytest.mark.req("ORCH-DATA-0032")
async def test_a_silent_engine_times_out_and_frees_its_slot(settings_for: SettingsFactory) -> None:
    decode_timeout_ms = 300
    hanging = pool(
        replicas=1,
        slots_per_replica=1,
        decode_timeout_ms=decode_timeout_ms,
        mock={"ttft_ms": 1, "tokens_per_s": 0, "failure": {"mode": "hang", "after_tokens": 2}},
    )
    async with serve(settings_for(config(hanging))) as wire:
        first = await wire.submit(max_tokens=8)
        frames = await wire.read_all(first)
        first_task = await wire.task(first)
        # One replica with one slot: this task can only start if the timeout freed the slot
        # (and then the same engine hangs again).
        second = await wire.submit(max_tokens=8)
        second_frames = await wire.read_all(second)
        second_task = await wire.task(second)

    for stream in (frames, second_frames):
        assert kinds(stream) == ["started", "token", "token", "error"]
        assert_sequenced(stream)
        assert events(stream)[-1].payload["code"] == "DECODE_TIMEOUT"
        assert events(stream)[-1].payload["retriable"] is True
    # The error waited for the engine's silence to last decode_timeout_ms (a lower bound; half
    # of it leaves room for the delivery latency of the last token).
    silence_s = events(frames)[-1].at - tokens(frames)[-1].at
    assert silence_s >= decode_timeout_ms / 1000 / 2
    for task in (first_task, second_task):
        assert task["state"] == "failed"
        assert task["error"]["code"] == "DECODE_TIMEOUT"
    assert events(second_frames)[0].payload["replica_id"] == "default-0"
