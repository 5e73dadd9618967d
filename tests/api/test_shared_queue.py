"""The shared queue of cluster mode (PostgreSQL), in process: what two processes need not show."""

from __future__ import annotations

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
