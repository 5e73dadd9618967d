"""What survives a restart of the server on the same database."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from tests.conftest import SettingsFactory
from tests.support import BUSY, fill_slots, in_process, pool, write_lock_held


@pytest.mark.req("ORCH-DATA-0011")
async def test_queued_tasks_run_after_a_restart(settings_for: SettingsFactory) -> None:
    busy = settings_for(
        {"server": {"shutdown_grace_s": 0}, "pools": [pool(slots_per_replica=1, mock=BUSY)]}
    )
    async with in_process(busy) as api:
        [running] = await fill_slots(api, 1)
        queued = (await api.submit(max_tokens=3)).json()
        session_before = (await api.client.get(f"/v1/sessions/{queued['session_id']}")).json()

    # The same database, now with a replica that answers at once.
    fast = settings_for({"pools": [pool(slots_per_replica=1)]})
    assert fast.database_path == busy.database_path
    async with in_process(fast) as api:
        events = await api.events(queued["task_id"])
        assert events[0].event == "started" and events[-1].event == "end"
        assert (await api.client.get(f"/v1/tasks/{queued['task_id']}")).json()["state"] == (
            "succeeded"
        )
        # The task running at shutdown was canceled and recorded, not left open.
        assert (await api.client.get(f"/v1/tasks/{running}")).json()["state"] == "canceled"
        session = (await api.client.get(f"/v1/sessions/{queued['session_id']}")).json()
        assert session["turns"] == session_before["turns"]


@pytest.mark.req("ORCH-STATE-0004")
async def test_an_end_storage_refuses_is_retried_and_its_terminal_frame_waits(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "server": {"storage_busy_timeout_ms": 50},
            "pools": [pool(mock={"ttft_ms": 0, "tokens_per_s": 200, "eos": False})],
        }
    )
    async with in_process(settings) as api:
        created = await api.client.post("/v1/sessions", json={"budgets": {"tokens": 1000}})
        sid = created.json()["session_id"]
        task_id = (await api.submit(max_tokens=10, session_id=sid)).json()["task_id"]
        await api.wait_state(task_id, "running")
        # Another process holds the write lock past the busy timeout while the task ends.
        with write_lock_held(settings.database_path):
            await asyncio.sleep(0.5)  # ten tokens take 50 ms: the engine is done
            held = (await api.client.get(f"/v1/tasks/{task_id}")).json()
            assert held["state"] == "running" and held["timings"]["ended_ms"] is None
            metrics = (await api.client.get("/metrics")).text
            assert 'llorch_tasks_finished_total{outcome="succeeded"' not in metrics
        done = await api.wait_state(task_id, "succeeded", "failed", "canceled")
        assert done["state"] == "succeeded" and done["usage"]["tokens_out"] == 10
        events = await api.events(task_id)
        assert [e.event for e in events if e.event in ("end", "error")] == ["end"]
        assert events[-1].data["tokens_out"] == 10
        # Charged once: its prompt and its ten tokens.
        session = (await api.client.get(f"/v1/sessions/{sid}")).json()
        used = done["usage"]["tokens_in"] + done["usage"]["tokens_out"]
        assert session["budgets"]["tokens_remaining"] == 1000 - used


@pytest.mark.req("ORCH-STATE-0006")
async def test_a_task_row_that_cannot_be_restored_is_ended_and_start_up_goes_on(
    settings_for: SettingsFactory,
) -> None:
    busy = settings_for(
        {"server": {"shutdown_grace_s": 0}, "pools": [pool(slots_per_replica=1, mock=BUSY)]}
    )
    async with in_process(busy) as api:
        await fill_slots(api, 1)
        broken, kept = [(await api.submit(max_tokens=3)).json()["task_id"] for _ in range(2)]
    # The row of one queued task is damaged while the server is down.
    with sqlite3.connect(busy.database_path) as db:
        db.execute("UPDATE tasks SET request_json = '{\"model\": ' WHERE task_id = ?", (broken,))

    async with in_process(settings_for({"pools": [pool(slots_per_replica=1)]})) as api:
        ended = (await api.client.get(f"/v1/tasks/{broken}")).json()
        assert ended["state"] == "failed" and ended["error"]["code"] == "WORKER_RESET"
        assert [e.event for e in await api.events(broken)] == ["error"]
        assert (await api.wait_state(kept, "succeeded"))["usage"]["tokens_out"] == 3


@pytest.mark.req("ORCH-STATE-0009")
async def test_a_write_waiting_for_the_lock_stalls_no_other_request_or_stream(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "server": {"storage_busy_timeout_ms": 10_000},
            "pools": [pool(mock={"ttft_ms": 0, "tokens_per_s": 100, "eos": False})],
        }
    )
    async with in_process(settings) as api:
        streaming = (await api.submit(max_tokens=400)).json()["task_id"]
        await api.wait_state(streaming, "running")
        events = api.runtime.scheduler.registry.stream(streaming)
        assert events is not None
        # Another process holds the write lock: a submission waits for it...
        with write_lock_held(settings.database_path):
            waiting = asyncio.ensure_future(api.submit(max_tokens=1))
            seen = events.next_seq
            await asyncio.sleep(0.3)
            # ...while liveness, reads and the running task's stream go on.
            assert (await api.client.get("/livez")).status_code == 200
            assert (await api.client.get(f"/v1/tasks/{streaming}")).status_code == 200
            assert events.next_seq > seen
            assert not waiting.done()
        accepted = await waiting  # the lock released: the same submission is admitted
        assert accepted.status_code == 202, accepted.text
        await api.client.post(f"/v1/tasks/{streaming}/cancel")
