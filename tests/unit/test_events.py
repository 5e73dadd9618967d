"""EventStream: contiguous ids, late and resumed subscribers, one terminal event, heartbeats."""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from llorch.scheduler.events import Event, EventStream, StreamClosed


def finished_stream(tokens: int = 3) -> EventStream:
    stream = EventStream()
    stream.publish("started", {"pool_id": "default"})
    for i in range(tokens):
        stream.publish("token", {"t": f"w{i}", "i": i})
    stream.publish("end", {"finish_reason": "length"})
    return stream


async def read_all(stream: EventStream, *, after: int | None = None) -> list[Event]:
    seen: list[Event] = []
    async with asyncio.timeout(2):
        async for event in stream.subscribe(after=after):
            assert event is not None  # no heartbeat was asked for
            seen.append(event)
    return seen


@pytest.mark.req("ORCH-DATA-0051")
def test_published_events_get_contiguous_ids_from_zero() -> None:
    stream = finished_stream(tokens=3)

    assert [e.seq for e in stream.events] == [0, 1, 2, 3, 4]
    assert [e.kind for e in stream.events] == ["started", "token", "token", "token", "end"]
    assert stream.events[2].data == {"t": "w1", "i": 1}


@pytest.mark.req("ORCH-DATA-0050", "ORCH-DATA-0053")
async def test_a_subscriber_attaching_after_the_end_gets_everything_then_stops() -> None:
    stream = finished_stream(tokens=2)

    seen = await read_all(stream)

    assert seen == stream.events
    assert [e.seq for e in seen] == [0, 1, 2, 3]
    assert seen[-1].kind == "end"


@pytest.mark.req("ORCH-DATA-0053")
async def test_a_subscriber_resumes_after_a_given_id() -> None:
    stream = finished_stream(tokens=3)

    assert [e.seq for e in await read_all(stream, after=1)] == [2, 3, 4]
    # Resuming after the terminal event yields nothing and ends.
    assert await read_all(stream, after=4) == []
    # An id before the first one resumes from the beginning, each event once.
    assert [e.seq for e in await read_all(stream, after=-3)] == [0, 1, 2, 3, 4]


@pytest.mark.req("ORCH-DATA-0050")
@pytest.mark.parametrize("terminal", ["end", "error"])
def test_nothing_can_be_published_after_the_terminal_event(terminal: str) -> None:
    stream = EventStream()
    stream.publish("started", {})
    open_before = stream.closed
    stream.publish(terminal, {"code": "WORKER_RESET"})
    assert (open_before, stream.closed) == (False, True)

    with pytest.raises(StreamClosed):
        stream.publish("token", {"t": "late"})
    with pytest.raises(StreamClosed):
        stream.publish("end", {})
    assert len(stream.events) == 2


@pytest.mark.req("ORCH-DATA-0054")
async def test_an_idle_live_stream_yields_a_heartbeat() -> None:
    stream = EventStream()
    stream.publish("started", {})
    events = stream.subscribe(heartbeat_s=0.01)

    async with asyncio.timeout(2):
        first = await anext(events)
        assert first is not None and first.kind == "started"
        # Nothing is published: the subscriber is told the stream is idle.
        assert await anext(events) is None
        assert await anext(events) is None
        stream.publish("end", {})
        last = await anext(events)
        assert last is not None and (last.seq, last.kind) == (1, "end")
        with pytest.raises(StopAsyncIteration):
            await anext(events)


@pytest.mark.req("ORCH-DATA-0050", "ORCH-DATA-0051", "ORCH-DATA-0052")
async def test_two_concurrent_subscribers_each_see_every_event_as_it_is_published() -> None:
    stream = EventStream()
    received: list[list[Event]] = [[], []]
    progress = [asyncio.Event(), asyncio.Event()]

    async def consume(index: int) -> None:
        async for event in stream.subscribe():
            assert event is not None
            received[index].append(event)
            progress[index].set()

    async def delivered(count: int) -> None:
        # Each subscriber must have the event before the next one is published.
        for index in (0, 1):
            while len(received[index]) < count:
                progress[index].clear()
                await progress[index].wait()

    async with asyncio.timeout(2), asyncio.TaskGroup() as group:
        for index in (0, 1):
            group.create_task(consume(index))
        stream.publish("started", {})
        await delivered(1)
        for i in range(5):
            stream.publish("token", {"t": f"w{i}", "i": i})
            await delivered(i + 2)
        stream.publish("end", {"finish_reason": "length"})

    assert received[0] == stream.events
    assert received[1] == stream.events
    assert [e.seq for e in received[0]] == list(range(7))


@pytest.mark.req("ORCH-DATA-0053")
async def test_a_subscriber_waiting_for_a_future_id_is_woken_when_it_arrives() -> None:
    stream = EventStream()
    stream.publish("started", {})

    async def resume_after_zero() -> list[Event]:
        return await read_all(stream, after=0)

    reader = asyncio.create_task(resume_after_zero())
    stream.publish("token", {"t": "a", "i": 0})
    stream.publish("error", {"code": "WORKER_RESET"})
    seen = await reader

    assert [(e.seq, e.kind) for e in seen] == [(1, "token"), (2, "error")]


@pytest.mark.req("ORCH-DATA-0059")
async def test_a_streams_byte_estimate_follows_the_memory_its_events_hold() -> None:
    # The registry's byte budget is only as good as this estimate: check it against what the
    # allocator really holds for a long task (tokens with a metrics event every 16).
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        stream = EventStream()
        stream.publish("started", {"task_id": "t-1", "pool_id": "default", "kv_warmth": False})
        for i in range(4000):
            stream.publish("token", {"t": f" w{i % 97}", "i": i})
            if i % 16 == 15:
                budgets = {"tokens_remaining": 10**6 - i, "time_ms_remaining": 9 * 10**5 + i}
                metrics = {"tokens_out": i, "tokens_per_s": i / 7, "budgets": budgets}
                stream.publish("metrics", metrics)
        stream.publish("end", {"tokens_out": 4000, "finish_reason": "length"})
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert held / 2 <= stream.approx_bytes <= held * 2, (held, stream.approx_bytes)
