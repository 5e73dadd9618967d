"""SSE delivery on a real socket: frames as they are produced, late attach, resume, heartbeats."""

from __future__ import annotations

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
    take_until,
    tokens,
)
from tests.support import pool

pytestmark = [pytest.mark.wire]


@pytest.mark.req("ORCH-DATA-0052", "ORCH-DATA-0050", "ORCH-DATA-0051")
async def test_token_frames_arrive_while_the_task_still_runs(
    settings_for: SettingsFactory,
) -> None:
    tokens_per_s = 20
    settings = settings_for(config(pool(mock={"ttft_ms": 50, "tokens_per_s": tokens_per_s})))
    async with serve(settings) as wire:
        task_id = await wire.submit(max_tokens=6)
        frames = await wire.read_all(task_id)

    assert kinds(frames) == ["started"] + ["token"] * 6 + ["end"]
    assert_sequenced(frames)
    first, end = tokens(frames)[0], events(frames)[-1]
    arrivals = [f.at for f in events(frames)]
    assert arrivals == sorted(arrivals)
    # The engine spaces its 6 tokens 50 ms apart: the end comes >= 250 ms after the first token.
    # A buffered stream would hand the client every frame at once.
    assert end.at - first.at >= 3 / tokens_per_s, [round(t - arrivals[0], 3) for t in arrivals]


@pytest.mark.req("ORCH-DATA-0053", "ORCH-DATA-0051")
async def test_attach_after_the_end_replays_everything_and_resumes_after_last_event_id(
    settings_for: SettingsFactory,
) -> None:
    async with serve(settings_for(config(pool()))) as wire:
        task_id = await wire.submit(max_tokens=5)
        await wire.wait_state(task_id, "succeeded")

        full = await wire.read_all(task_id)
        again = await wire.read_all(task_id)
        resumed = await wire.read_all(task_id, {"Last-Event-ID": "2"})

    assert kinds(full) == ["started"] + ["token"] * 5 + ["end"]
    assert_sequenced(full)
    assert comparable(again) == comparable(full)
    assert [f.id for f in events(resumed)] == [3, 4, 5, 6]
    assert comparable(resumed) == comparable(full)[3:]


@pytest.mark.req("ORCH-DATA-0058", "ORCH-DATA-0050")
@pytest.mark.parametrize("retained", [None, 0], ids=["in-memory", "from-row"])
@pytest.mark.parametrize("outcome", ["end", "error"])
async def test_resuming_at_or_past_the_terminal_frame_replays_it(
    settings_for: SettingsFactory, outcome: str, retained: int | None
) -> None:
    # An empty 200 here would make a browser EventSource reconnect for ever.
    mock = {"failure": {"mode": "mid_stream", "after_tokens": 2}} if outcome == "error" else {}
    server = {} if retained is None else {"streams_retained": retained}
    async with serve(settings_for(config(pool(mock=mock), **server))) as wire:
        task_id = await wire.submit(max_tokens=4)
        await wire.wait_state(task_id, "succeeded", "failed")
        terminal = comparable(await wire.read_all(task_id))[-1]
        terminal_id = terminal[0]
        assert terminal_id is not None
        at = await wire.read_all(task_id, {"Last-Event-ID": str(terminal_id)})
        past = await wire.read_all(task_id, {"Last-Event-ID": str(terminal_id + 5)})

    assert terminal[1] == outcome
    # read_all returns once the server closes the stream: nothing follows the terminal frame.
    assert comparable(at) == [terminal]
    assert comparable(past) == [terminal]


@pytest.mark.req("ORCH-DATA-0053", "ORCH-DATA-0051")
async def test_resuming_a_task_whose_events_left_memory_still_reaches_its_terminal_frame(
    settings_for: SettingsFactory,
) -> None:
    # streams_retained 0: an ended task's events are not kept in memory; its stream is rebuilt
    # from its trace (or the database). Whatever is replayed, the terminal frame keeps its
    # sequence number (6: started, 5 tokens, end), so a client resuming after an earlier id
    # still gets it.
    async with serve(settings_for(config(pool(), streams_retained=0))) as wire:
        task_id = await wire.submit(max_tokens=5)
        task = await wire.wait_state(task_id, "succeeded")
        attached = await wire.read_all(task_id)
        resumed = await wire.read_all(task_id, {"Last-Event-ID": "2"})

    assert task["usage"]["tokens_out"] == 5
    for frames in (attached, resumed):
        assert frames, "the stream closed without its terminal frame"
        end = events(frames)[-1]
        assert (end.id, end.event) == (6, "end"), [(f.id, f.event) for f in events(frames)]
        assert end.payload["tokens_out"] == 5
        assert end.payload["finish_reason"] == "length"


@pytest.mark.req("ORCH-DATA-0053", "ORCH-DATA-0050")
async def test_attach_mid_run_gets_the_earlier_events_then_the_live_ones(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config(pool(mock={"ttft_ms": 1, "tokens_per_s": 20})))
    async with serve(settings) as wire:
        task_id = await wire.submit(max_tokens=20, seed=LONG_SEED)
        async with wire.stream(task_id) as (_, first_reader):
            head = await take_until(first_reader, nth_token(2))
            async with wire.stream(task_id) as (_, late_reader):
                late_head = await take_until(late_reader, lambda f: f.event is not None)
                # The late reader is subscribed while the task still runs (~0.9 s are left).
                assert (await wire.task(task_id))["state"] == "running"
                late = late_head + await rest(late_reader)
            first = head + await rest(first_reader)

    # One `metrics` frame per 16 tokens (server.metrics_every_tokens) is interleaved.
    assert kinds(first) == ["started"] + ["token"] * 16 + ["metrics"] + ["token"] * 4 + ["end"]
    assert_sequenced(first)
    assert events(first)[-1].payload["finish_reason"] == "length"
    assert late_head[0].id == 0
    assert comparable(late) == comparable(first)


@pytest.mark.req("ORCH-DATA-0054")
async def test_an_idle_stream_gets_comment_heartbeats(settings_for: SettingsFactory) -> None:
    heartbeat_s = 0.2
    settings = settings_for(
        config(pool(mock={"ttft_ms": 1500, "tokens_per_s": 0}), heartbeat_s=heartbeat_s)
    )
    async with serve(settings) as wire:
        task_id = await wire.submit(max_tokens=2)
        frames = await wire.read_all(task_id)

    # `started` is published at dispatch, before the engine's 1.5 s of silence: the heartbeats
    # come between it and the first token.
    names = [f.event or f": {f.comment}" for f in frames]
    first_token = names.index("token")
    idle = names[1:first_token]
    assert names[0] == "started", names
    assert set(idle) == {": heartbeat"}, names
    assert len(idle) >= 2, names
    assert kinds(frames) == ["started", "token", "token", "end"]
    assert_sequenced(frames)
    # A heartbeat marks idleness: none comes right after `started` (half the period leaves
    # room for the delivery latency of `started` itself).
    heartbeats = [f for f in frames if f.comment is not None]
    assert heartbeats[0].at - frames[0].at >= heartbeat_s / 2


@pytest.mark.req("ORCH-DATA-0096", "ORCH-DATA-0051", "ORCH-DATA-0059")
async def test_a_stream_evicted_from_memory_is_replayed_whole_from_the_tasks_trace(
    settings_for: SettingsFactory,
) -> None:
    # A byte budget that holds no stream: every ended task is replayed from its trace artifact.
    slow = pool(mock={"ttft_ms": 1, "tokens_per_s": 40})
    settings = settings_for(config(slow, streams_retained_bytes=0, metrics_every_tokens=2))
    async with serve(settings) as wire:
        task_id = await wire.submit(max_tokens=6)
        live = await wire.read_all(task_id)  # attached while it runs: the stream in memory
        await wire.wait_state(task_id, "succeeded")
        replayed = await wire.read_all(task_id)
        resumed = await wire.read_all(task_id, {"Last-Event-ID": "2"})

    assert kinds(live)[0] == "started" and "metrics" in kinds(live)
    assert_sequenced(replayed)
    # Every frame again, under its own id and with its own data, not only the terminal one.
    assert comparable(replayed) == comparable(live)
    assert comparable(resumed) == comparable(live)[3:]


@pytest.mark.req("ORCH-DATA-0096", "ORCH-DATA-0051")
async def test_without_a_readable_trace_only_the_terminal_frame_is_replayed(
    settings_for: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(config(pool(), streams_retained=0))
    async with serve(settings) as wire:
        task_id = await wire.submit(max_tokens=5)
        task = await wire.wait_state(task_id, "succeeded")
        digest = task["trace_artifact_id"].removeprefix("sha256:")
        (settings.artifacts_dir / digest[:2] / digest).write_text("not the trace")
        frames = await wire.read_all(task_id)

    assert [(f.id, f.event) for f in events(frames)] == [(6, "end")]
    assert events(frames)[0].payload["tokens_out"] == 5
    assert any("cannot replay its stream from trace" in r.getMessage() for r in caplog.records)
