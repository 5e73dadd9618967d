"""Reading, listing and canceling tasks, in process."""

from __future__ import annotations

import sqlite3

import pytest

from tests.conftest import SettingsFactory
from tests.support import BUSY, assert_envelope, fill_slots, in_process, pool, sql_connection


@pytest.mark.req("ORCH-DATA-0040", "ORCH-DATA-0020")
async def test_task_view_while_queued_and_after_the_end(settings_for: SettingsFactory) -> None:
    settings = settings_for(
        {"server": {"shutdown_grace_s": 0}, "pools": [pool(slots_per_replica=1, mock=BUSY)]}
    )
    async with in_process(settings) as api:
        await fill_slots(api, 1)
        batch = (await api.submit(priority="batch")).json()["task_id"]
        interactive = (await api.submit(priority="interactive")).json()["task_id"]
        # The interactive task overtakes the batch task that came first.
        first = (await api.client.get(f"/v1/tasks/{interactive}")).json()
        second = (await api.client.get(f"/v1/tasks/{batch}")).json()
        assert (first["queue_position"], second["queue_position"]) == (0, 1)
        assert first["state"] == second["state"] == "queued"
        assert first["replica_id"] is None and "error" not in first

        assert (await api.client.post(f"/v1/tasks/{batch}/cancel")).status_code == 204
        ended = (await api.client.get(f"/v1/tasks/{batch}")).json()
        assert ended["state"] == "canceled" and ended["finish_reason"] == "canceled"
        assert ended["queue_position"] is None
        assert ended["timings"]["ended_ms"] >= ended["timings"]["created_ms"]


@pytest.mark.req("ORCH-DATA-0040", "ORCH-DATA-0083")
async def test_finished_task_reports_usage_timings_and_priced_cost(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "pools": [pool(mock={"ttft_ms": 5, "tokens_per_s": 0, "eos": False})],
            "pricing": {
                "default": {"input_per_1k": 1.0, "output_per_1k": 1.0},
                "models": {"mock-small": {"input_per_1k": 2.0, "output_per_1k": 10.0}},
            },
        }
    )
    async with in_process(settings) as api:
        task_id = (await api.submit(prompt="one two three four", max_tokens=10)).json()["task_id"]
        events = await api.events(task_id)
        end = events[-1].data
        task = (await api.client.get(f"/v1/tasks/{task_id}")).json()
        assert task["state"] == "succeeded" and task["finish_reason"] == "length"
        assert task["replica_id"] == "default-0"
        assert task["usage"] == {"tokens_in": 4, "tokens_out": 10, "cost": end["cost"]}
        assert end["cost"] == pytest.approx((4 * 2.0 + 10 * 10.0) / 1000)
        assert task["timings"]["ttft_ms"] is not None and task["timings"]["ttft_ms"] >= 5


@pytest.mark.req("ORCH-DATA-0040", "ORCH-DATA-0060", "ORCH-ERR-0001")
async def test_unknown_task_answers_404_on_every_task_operation(
    settings_for: SettingsFactory,
) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        for response in (
            await api.client.get("/v1/tasks/t-missing"),
            await api.client.get("/v1/tasks/t-missing/stream"),
            await api.client.post("/v1/tasks/t-missing/cancel"),
        ):
            assert_envelope(response, 404, "TASK_NOT_FOUND")
        assert_envelope(await api.client.get("/v1/tasks/bad%20id"), 400, "INVALID_PARAMS")


@pytest.mark.req("ORCH-DATA-0041")
async def test_listing_pages_newest_first_with_filters(settings_for: SettingsFactory) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        session = (await api.client.post("/v1/sessions", json={})).json()["session_id"]
        mine = [
            (await api.submit(session_id=session, task_id=f"mine-{i}")).json()["task_id"]
            for i in range(5)
        ]
        await api.submit(task_id="other")
        for task_id in mine:
            await api.events(task_id)

        seen: list[str] = []
        cursor = None
        while True:
            params = {"session_id": session, "limit": "2"}
            if cursor:
                params["cursor"] = cursor
            page = (await api.client.get("/v1/tasks", params=params)).json()
            seen += [t["task_id"] for t in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(reversed(mine))

        done = (await api.client.get("/v1/tasks", params={"state": "succeeded"})).json()
        assert {t["state"] for t in done["items"]} == {"succeeded"}
        # The largest cursor the contract admits is past every task, not a server error.
        huge = await api.client.get("/v1/tasks", params={"cursor": "9" * 19, "limit": "200"})
        assert huge.status_code == 200 and len(huge.json()["items"]) == 6
        for bad in ({"limit": "0"}, {"limit": "201"}, {"state": "lost"}, {"cursor": "x"}):
            response = await api.client.get("/v1/tasks", params=bad)
            assert_envelope(response, 400, "INVALID_PARAMS")


@pytest.mark.req("ORCH-DATA-0060", "ORCH-DATA-0061")
async def test_cancel_is_idempotent_and_a_canceled_queued_task_never_runs(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {"server": {"shutdown_grace_s": 0}, "pools": [pool(slots_per_replica=1, mock=BUSY)]}
    )
    async with in_process(settings) as api:
        [running] = await fill_slots(api, 1)
        queued = (await api.submit()).json()["task_id"]
        for _ in range(2):
            assert (await api.client.post(f"/v1/tasks/{queued}/cancel")).status_code == 204
        events = await api.events(queued)
        assert [(e.event, e.data["finish_reason"]) for e in events] == [("end", "canceled")]
        # Freeing the slot does not bring the canceled task back.
        assert (await api.client.post(f"/v1/tasks/{running}/cancel")).status_code == 204
        await api.wait_state(running, "canceled")
        task = (await api.client.get(f"/v1/tasks/{queued}")).json()
        assert task["state"] == "canceled" and task["timings"]["started_ms"] is None
        # Canceling a task that already ended changes nothing.
        assert (await api.client.post(f"/v1/tasks/{running}/cancel")).status_code == 204
        assert (await api.client.get(f"/v1/tasks/{running}")).json()["state"] == "canceled"


@pytest.mark.req("ORCH-DATA-0031")
async def test_tokens_are_not_written_to_the_database_one_by_one(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for({"pools": [pool(mock={"ttft_ms": 0, "tokens_per_s": 0, "eos": False})]})
    async with in_process(settings) as api:
        # Count the statements the server runs while a 300-token task streams.
        conn: sqlite3.Connection = sql_connection(api)
        writes: list[str] = []
        conn.set_trace_callback(
            lambda sql: (
                writes.append(sql) if sql.lstrip().startswith(("INSERT", "UPDATE")) else None
            )
        )
        task_id = (await api.submit(max_tokens=300)).json()["task_id"]
        events = await api.events(task_id)
        conn.set_trace_callback(None)
        assert sum(e.event == "token" for e in events) == 300
        task_writes = [w for w in writes if "tasks" in w.split("SET")[0].split("(")[0]]
        # Admission, start, end: three writes of the task row, whatever the length.
        assert len(task_writes) == 3, task_writes


@pytest.mark.req("ORCH-ERR-0005", "ORCH-ERR-0001")
async def test_unknown_routes_and_methods_answer_the_envelope(
    settings_for: SettingsFactory,
) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        assert_envelope(await api.client.get("/v2/nothing"), 404, "NOT_FOUND")
        assert_envelope(await api.client.delete("/v1/tasks"), 405, "METHOD_NOT_ALLOWED")


@pytest.mark.req("ORCH-DATA-0059", "ORCH-DATA-0096")
async def test_ended_streams_are_kept_within_the_byte_budget_and_the_rest_replayed_from_traces(
    settings_for: SettingsFactory,
) -> None:
    # A 40-token task's stream is estimated at ~16 KB: a 40 KB budget keeps two of five, and a
    # count of 1000 never binds.
    budget = 40_000
    server = {"streams_retained": 1000, "streams_retained_bytes": budget}
    async with in_process(settings_for({"server": server, "pools": [pool()]})) as api:
        ids = []
        for _ in range(5):
            task_id = (await api.submit(max_tokens=40)).json()["task_id"]
            await api.wait_state(task_id, "succeeded")
            ids.append(task_id)
        registry = api.runtime.scheduler.registry
        kept = [registry.stream(t) is not None for t in ids]
        retained_bytes = registry.retained_bytes
        oldest = await api.events(ids[0])

    assert kept == [False, False, False, True, True]
    assert 0 < retained_bytes <= budget
    # The evicted stream comes back whole from its trace: started, 40 tokens, metrics, end.
    assert [f.id for f in oldest] == list(range(len(oldest)))
    assert sum(f.event == "token" for f in oldest) == 40 and oldest[-1].event == "end"


async def test_opening_a_stream_reads_the_task_row_once(settings_for: SettingsFactory) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        conn: sqlite3.Connection = sql_connection(api)
        task_id = (await api.submit(max_tokens=3)).json()["task_id"]
        await api.events(task_id)
        reads: list[str] = []
        conn.set_trace_callback(lambda sql: reads.append(sql) if "FROM tasks" in sql else None)
        # With its stream still in memory, then forgotten (replayed from the row).
        for forget in (False, True):
            if forget:
                api.runtime.scheduler.registry._ended.clear()
            reads.clear()
            events = await api.events(task_id, **{"last-event-id": "0"})
            assert events[-1].event == "end"
            assert len(reads) == 1, reads
        conn.set_trace_callback(None)


@pytest.mark.req("ORCH-DATA-0097")
async def test_a_task_that_waits_past_its_wait_limit_ends_queue_timeout_uncharged(
    settings_for: SettingsFactory,
) -> None:
    busy = pool(slots_per_replica=1, mock=BUSY, queue={"max_wait_ms": 300})
    async with in_process(settings_for({"pools": [busy]})) as api:
        await fill_slots(api, 1)
        created = await api.client.post("/v1/sessions", json={"budgets": {"tokens": 5000}})
        sid = created.json()["session_id"]
        # The pool's limit, and a task asking for less than it.
        pooled = (await api.submit(session_id=sid)).json()["task_id"]
        sooner = (await api.submit(session_id=sid, max_wait_ms=50)).json()["task_id"]
        ended = await api.wait_state(sooner, "failed")
        still = (await api.client.get(f"/v1/tasks/{pooled}")).json()
        assert still["state"] == "queued"  # 50 ms passed for the one, not 300 for the other
        late = await api.wait_state(pooled, "failed")
        session = (await api.client.get(f"/v1/sessions/{sid}")).json()
        frames = [await api.events(t) for t in (sooner, pooled)]

    for task in (ended, late):
        assert task["error"]["code"] == "QUEUE_TIMEOUT" and task["error"]["retriable"]
        assert task["usage"] == {"tokens_in": 0, "tokens_out": 0, "cost": 0.0}
        assert task["timings"]["started_ms"] is None
    waited_ms = late["timings"]["ended_ms"] - late["timings"]["created_ms"]
    assert waited_ms >= 300
    for stream in frames:
        # One terminal frame, the error, with the drain rate's advice.
        assert [f.event for f in stream] == ["error"]
        assert stream[0].data["code"] == "QUEUE_TIMEOUT"
        assert stream[0].data["retry_after_ms"] > 0
    # Reservations released, nothing charged.
    assert session["budgets"]["tokens_remaining"] == 5000
