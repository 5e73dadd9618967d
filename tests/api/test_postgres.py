"""The server on PostgreSQL (``database.url``): the way of a task, end to end, in process."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import psycopg
import pytest

from llorch.persistence.pg_events import Read, Transcript
from llorch.persistence.postgres import PostgresStorage
from tests.conftest import SettingsFactory
from tests.support import InProcess, in_process, pool
from tools.postgres import private_cluster


@pytest.mark.req("ORCH-STATE-0007")
async def test_a_task_runs_end_to_end_on_postgresql(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    settings = settings_for({"database": {"url": postgres_url}, "pools": [pool()]})
    async with in_process(settings) as api:
        assert isinstance(api.runtime._db, PostgresStorage)
        assert (await api.client.get("/readyz")).status_code == 200
        created = await api.client.post("/v1/sessions", json={"budgets": {"tokens": 1000}})
        sid = created.json()["session_id"]
        task_id = (await api.submit(max_tokens=4, session_id=sid)).json()["task_id"]

        events = await api.events(task_id)
        assert (events[0].event, events[-1].event) == ("started", "end")
        task = await api.wait_state(task_id, "succeeded")
        assert task["usage"]["tokens_out"] == 4
        session = (await api.client.get(f"/v1/sessions/{sid}")).json()
        used = task["usage"]["tokens_in"] + task["usage"]["tokens_out"]
        assert session["budgets"]["tokens_remaining"] == 1000 - used
        trace = await api.client.get(f"/v1/artifacts/{task['trace_artifact_id']}")
        assert trace.status_code == 200 and trace.json()["kind"] == "trace"
        listed = (await api.client.get("/v1/tasks", params={"session_id": sid})).json()
        assert [t["task_id"] for t in listed["items"]] == [task_id]

    # The state is in PostgreSQL, and no SQLite file was made.
    assert not settings.database_path.exists()
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT state, tokens_out FROM tasks WHERE task_id = %s", (task_id,))
        assert row.fetchone() == ("succeeded", 4)


@pytest.mark.req("ORCH-STATE-0007", "ORCH-DATA-0011")
async def test_queued_tasks_run_after_a_restart_on_postgresql(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    database = {"url": postgres_url}
    busy = settings_for(
        {"database": database, "pools": [pool(slots_per_replica=1, mock={"ttft_ms": 60_000})]}
    )
    async with in_process(busy) as api:
        running = (await api.submit()).json()["task_id"]
        await api.wait_state(running, "running")
        queued = (await api.submit(max_tokens=3)).json()["task_id"]

    async with in_process(settings_for({"database": database, "pools": [pool()]})) as api:
        done = await api.wait_state(queued, "succeeded")
        assert done["usage"]["tokens_out"] == 3
        assert (await api.client.get(f"/v1/tasks/{running}")).json()["state"] == "canceled"


@pytest.mark.req("ORCH-STATE-0007", "ORCH-STATE-0004", "ORCH-CTRL-0042")
async def test_an_end_postgresql_refuses_is_retried_and_readiness_says_storage(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    settings = settings_for(
        {
            "database": {"url": postgres_url},
            "server": {"storage_busy_timeout_ms": 50},
            "pools": [pool(mock={"ttft_ms": 0, "tokens_per_s": 200, "eos": False})],
        }
    )
    async with in_process(settings) as api:
        task_id = (await api.submit(max_tokens=10)).json()["task_id"]
        await api.wait_state(task_id, "running")
        # Another client holds the tables' write lock past the lock timeout while the task ends.
        with psycopg.connect(postgres_url) as other:
            other.execute("LOCK TABLE tasks, sessions, artifacts, artifact_views IN EXCLUSIVE MODE")
            await asyncio.sleep(0.5)  # ten tokens take 50 ms: the engine is done
            held = (await api.client.get(f"/v1/tasks/{task_id}")).json()
            assert held["state"] == "running" and held["timings"]["ended_ms"] is None
            ready = await api.client.get("/readyz")
            assert ready.status_code == 503 and "storage" in ready.json()["message"]
            other.rollback()
        done = await api.wait_state(task_id, "succeeded", "failed", "canceled")
        assert done["state"] == "succeeded" and done["usage"]["tokens_out"] == 10
        assert [e.event for e in await api.events(task_id) if e.event in ("end", "error")] == [
            "end"
        ]
        assert (await api.client.get("/readyz")).status_code == 200


async def _until_ready(api: InProcess, status: int) -> None:
    # Readiness signals no event: poll its answer (bounded by the timeout).
    async with asyncio.timeout(30):
        while (await api.client.get("/readyz")).status_code != status:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.mark.req("ORCH-STATE-0010", "ORCH-CTRL-0042")
async def test_readiness_follows_a_lost_database_without_traffic(
    settings_for: SettingsFactory,
) -> None:
    # A cluster of this test's own: it is stopped. Only /readyz is asked meanwhile, so what
    # notices the outage and the return is the store's watcher, not a request.
    with private_cluster() as pg:
        url = pg.create_database("watched")
        settings = settings_for({"database": {"url": url, "retry_ms": 100}, "pools": [pool()]})
        async with in_process(settings) as api:
            await _until_ready(api, 200)
            pg.stop(mode="immediate")
            await _until_ready(api, 503)
            body = (await api.client.get("/readyz")).json()
            assert body["code"] == "NOT_READY" and "storage" in body["message"]
            pg.start()
            await _until_ready(api, 200)
            assert (await api.submit(max_tokens=2)).status_code == 202


@pytest.mark.req("ORCH-STATE-0051", "ORCH-STATE-0006")
async def test_a_quarantined_task_releases_its_reservation_on_postgresql(
    settings_for: SettingsFactory, postgres_url: str
) -> None:
    database = {"url": postgres_url}
    busy = settings_for(
        {
            "database": database,
            "server": {"shutdown_grace_s": 0},
            "pools": [pool(slots_per_replica=1, mock={"ttft_ms": 60_000})],
        }
    )
    async with in_process(busy) as api:
        sid = (await api.client.post("/v1/sessions", json={})).json()["session_id"]
        running = (await api.submit(max_tokens=3, session_id=sid)).json()["task_id"]
        await api.wait_state(running, "running")
        broken = (await api.submit(max_tokens=3, session_id=sid)).json()["task_id"]
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE tasks SET request_json = '{\"model\": ' WHERE task_id = %s", (broken,))

    async with in_process(settings_for({"database": database, "pools": [pool()]})) as api:
        # Its claim (the dispatcher's first) runs off the loop: a read may come before it.
        ended = await api.wait_state(broken, "failed")
        assert ended["error"]["code"] == "WORKER_RESET"
    with psycopg.connect(postgres_url) as conn:
        held = conn.execute(
            "SELECT tokens_reserved, time_ms_reserved, cost_reserved FROM sessions "
            "WHERE session_id = %s",
            (sid,),
        ).fetchone()
    assert held == (0, 0, 0.0)


@pytest.mark.req("ORCH-STATE-0061")
async def test_a_stream_opened_while_its_task_is_queued_is_fed_here_when_this_instance_runs_it(
    settings_for: SettingsFactory, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = {"ttft_ms": 1, "tokens_per_s": 200}
    settings = settings_for(
        {"database": {"url": postgres_url}, "pools": [pool(slots_per_replica=1, mock=slow)]}
    )
    async with in_process(settings) as api:
        fanout = api.runtime.scheduler._fanout
        assert fanout is not None
        transcript = fanout._links.transcript
        read_back: list[str] = []

        def read_many(after: Mapping[str, int]) -> dict[str, Read]:
            reads = Transcript.read_many(transcript, after)
            read_back.extend(t for t, read in reads.items() if read.frames)
            return reads

        monkeypatch.setattr(transcript, "read_many", read_many)
        busy = (await api.submit(max_tokens=100)).json()["task_id"]
        await api.wait_state(busy, "running")
        queued = (await api.submit(max_tokens=20)).json()["task_id"]
        events = await api.events(queued)
    assert [e.id for e in events] == list(range(len(events)))
    assert (events[0].event, events[-1].event) == ("started", "end")
    assert [e.event for e in events].count("token") == 20
    assert queued not in read_back  # its frames came from its own stream, not the database
