"""The shared queue of cluster mode (PostgreSQL), in process: what two processes need not show."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from tests.conftest import SettingsFactory
from tests.engines.scripted import Reply, ScriptedEngine, completion_chunks
from tests.support import in_process, pool


@pytest.mark.req("ORCH-STATE-0030", "ORCH-STATE-0006")
async def test_an_unreadable_task_at_the_head_of_the_shared_queue_is_ended_not_stuck(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    settings = settings_for({"database": {"url": postgres_url, "poll_ms": 20}, "pools": [pool()]})
    async with in_process(settings) as api:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO tasks (task_id, session_id, pool_id, model, priority, state, "
                "request_json, request_digest, correlation_id, created_ms) VALUES ('t-bad', "
                "'s-none', 'default', 'mock-small', 'interactive', 'queued', '{', 'd', 'c', 0)"
            )
            conn.execute(
                "INSERT INTO queue_entries (task_id, pool_id, band, flow, seq) "
                "SELECT task_id, pool_id, 0, '', seq FROM tasks WHERE task_id = 't-bad'"
            )
        good = (await api.submit(max_tokens=2)).json()["task_id"]

        done = await api.wait_state(good, "succeeded")
        bad = await api.wait_state("t-bad", "failed")

    assert done["usage"]["tokens_out"] == 2
    assert bad["error"]["code"] == "WORKER_RESET"
    with psycopg.connect(postgres_url) as conn:
        left = conn.execute("SELECT count(*) FROM slot_leases").fetchone()
    assert left == (0,)


@pytest.mark.req("ORCH-STATE-0033", "ORCH-ENG-0015")
async def test_a_task_its_engine_refuses_as_busy_goes_back_to_the_shared_queue(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    busy = Reply(('{"error": "busy"}',), status=429, content_type="application/json")
    good = Reply((*completion_chunks(["a", "b"], usage=(2, 2)), "data: [DONE]\n\n"))
    async with ScriptedEngine([busy, good]) as fake:
        engine_pool = {
            "engine": "openai",
            "endpoints": [fake.url],
            "discover_slots": False,
            "retry": {"attempts": 1, "requeues": 1, "backoff_ms": 10},
        }
        settings = settings_for(
            {"database": {"url": postgres_url, "poll_ms": 20}, "pools": [pool(**engine_pool)]}
        )
        async with in_process(settings) as api:
            task_id = (await api.submit(max_tokens=2)).json()["task_id"]
            done = await api.wait_state(task_id, "succeeded")
            with psycopg.connect(postgres_url) as conn:
                leases = conn.execute("SELECT count(*) FROM slot_leases").fetchone()
                entries = conn.execute("SELECT count(*) FROM queue_entries").fetchone()

    assert done["usage"]["tokens_out"] == 2
    assert len(fake.posts()) == 2  # refused once, then served after going back to the queue
    assert (leases, entries) == ((0,), (0,))


@pytest.mark.req("ORCH-STATE-0061", "ORCH-ENG-0015")
async def test_a_stream_fed_here_follows_its_task_through_a_send_back_without_gap_or_duplicate(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    hold = Reply(tuple(completion_chunks(["x"])), end="hang")
    busy = Reply(('{"error": "busy"}',), status=429, content_type="application/json")
    good = Reply((*completion_chunks(["a", "b"], usage=(2, 2)), "data: [DONE]\n\n"))
    async with ScriptedEngine([hold, busy, good]) as fake:
        engine_pool = {
            "engine": "openai",
            "endpoints": [fake.url],
            "discover_slots": False,
            "slots_per_replica": 1,
            "retry": {"attempts": 1, "requeues": 1, "backoff_ms": 10},
        }
        settings = settings_for(
            {"database": {"url": postgres_url, "poll_ms": 20}, "pools": [pool(**engine_pool)]}
        )
        async with in_process(settings) as api:
            fanout = api.runtime.scheduler._fanout
            assert fanout is not None
            holder = (await api.submit(max_tokens=2)).json()["task_id"]
            await api.wait_state(holder, "running")
            queued = (await api.submit(max_tokens=2)).json()["task_id"]
            reading = asyncio.create_task(api.events(queued))
            async with asyncio.timeout(10):
                # Its stream opened while it is queued (the request is served by another task).
                while queued not in fanout._mirrors:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
            assert (await api.client.post(f"/v1/tasks/{holder}/cancel")).status_code == 204
            async with asyncio.timeout(20):
                events = await reading

    assert len(fake.posts()) == 3  # the holder, then the queued task refused once, then served
    assert [e.id for e in events] == list(range(len(events)))
    assert [e.event for e in events if e.event in ("started", "end", "error")] == ["started", "end"]
    assert [e.data["t"] for e in events if e.event == "token"] == ["a", "b"]
