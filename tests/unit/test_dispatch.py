"""Running tasks: the real Scheduler and Dispatcher driving MockEngine replicas in process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest

from llorch.clock import FakeClock
from llorch.config import Settings
from llorch.errors import TaskNotFound
from llorch.persistence import Database, SessionRow, TaskRow
from llorch.scheduler import Scheduler
from llorch.scheduler.events import Event, EventStream
from llorch.scheduler.pools import Replica
from llorch.scheduler.task import TaskRecord
from llorch.sessions import SessionService
from tests.conftest import SettingsFactory
from tests.support import pool, task_body
from tests.unit.helpers import task_row

SLOW = {"ttft_ms": 1, "tokens_per_s": 40}  # 25 ms a token


@dataclass
class Running:
    scheduler: Scheduler
    db: Database

    def submit(self, **overrides: Any) -> str:
        return self.scheduler.admit(task_body(**overrides), "c-1").task_id

    def row(self, task_id: str) -> TaskRow:
        found = self.db.get_task(task_id)
        assert found is not None
        return found


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    db = Database.open(settings.database_path, profile="test")
    clock = FakeClock()
    scheduler = Scheduler(settings, db, SessionService(db, settings, clock), clock)
    try:
        await scheduler.start()
        yield Running(scheduler, db)
    finally:
        await scheduler.stop()
        db.close()


async def until_end(stream: EventStream) -> list[Event]:
    async with asyncio.timeout(5):
        return [e async for e in stream.subscribe() if e is not None]


def config(**pool_overrides: Any) -> Mapping[str, Any]:
    return {
        "pools": [pool(**pool_overrides)],
        "pricing": {"models": {"mock-small": {"input_per_1k": 1.0, "output_per_1k": 2.0}}},
        "server": {"metrics_every_tokens": 4},
    }


@pytest.mark.req("ORCH-DATA-0030", "ORCH-DATA-0050", "ORCH-DATA-0056", "ORCH-DATA-0083")
async def test_a_task_runs_to_its_end_with_interleaved_metrics(
    settings_for: SettingsFactory,
) -> None:
    async with running(settings_for(config())) as run:
        task_id = run.submit(max_tokens=8)
        events = await until_end(run.scheduler.stream(task_id))
        row = run.row(task_id)

    kinds = [e.kind for e in events]
    assert kinds == ["started"] + ["token"] * 4 + ["metrics"] + ["token"] * 4 + ["metrics", "end"]
    assert [e.seq for e in events] == list(range(len(events)))
    started = events[0].data
    assert (started["pool_id"], started["replica_id"], started["engine"]) == (
        "default",
        "default-0",
        "mock",
    )
    assert started["correlation_id"] == "c-1"
    assert events[5].data["tokens_out"] == 4
    assert set(events[5].data["budgets"]) == {
        "tokens_remaining",
        "time_ms_remaining",
        "cost_remaining",
    }
    end = events[-1].data
    # "tell me a story" is 4 mock tokens; 4 x 1.0 + 8 x 2.0 per 1k tokens.
    assert (end["tokens_in"], end["tokens_out"], end["finish_reason"]) == (4, 8, "length")
    assert end["cost"] == pytest.approx(0.02)
    assert (row.state, row.tokens_in, row.tokens_out, row.finish_reason) == (
        "succeeded",
        4,
        8,
        "length",
    )
    assert row.cost == pytest.approx(0.02)
    assert row.replica_id == "default-0"


@pytest.mark.req("ORCH-DATA-0082")
async def test_the_end_of_a_task_commits_usage_and_releases_the_reservation(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config())
    async with running(settings) as run:
        session_id = run.scheduler.sessions.create().row.session_id
        task_id = run.submit(session_id=session_id, max_tokens=6)
        await until_end(run.scheduler.stream(task_id))
        left = run.scheduler.remaining(session_id)
        session = run.scheduler.sessions.get(session_id)

    default = settings.budgets.default
    assert session.row.tokens_remaining == default.tokens - (4 + 6)
    assert session.row.cost_remaining == pytest.approx(default.cost - (4 * 1.0 + 6 * 2.0) / 1000)
    assert (session.row.last_pool_id, session.row.last_replica_id) == ("default", "default-0")
    # No reservation is left: what can be spent is what was committed.
    assert left.tokens == session.row.tokens_remaining


@pytest.mark.req("ORCH-DATA-0033", "ORCH-DATA-0082", "ORCH-DATA-0091")
async def test_an_engine_failure_ends_the_stream_with_its_code(
    settings_for: SettingsFactory,
) -> None:
    failing = {
        "ttft_ms": 1,
        "tokens_per_s": 0,
        "failure": {"mode": "mid_stream", "after_tokens": 3},
    }
    settings = settings_for(config(mock=failing))
    async with running(settings) as run:
        session_id = run.scheduler.sessions.create().row.session_id
        task_id = run.submit(session_id=session_id, max_tokens=10)
        events = await until_end(run.scheduler.stream(task_id))
        row = run.row(task_id)
        busy = run.scheduler.registry.pools["default"].slots_busy
        left = run.scheduler.remaining(session_id)

    assert [e.kind for e in events] == ["started", "token", "token", "token", "error"]
    assert (events[-1].data["code"], events[-1].data["retriable"]) == ("WORKER_RESET", True)
    assert (row.state, row.error_code, row.error_retriable, row.tokens_out) == (
        "failed",
        "WORKER_RESET",
        True,
        3,
    )
    assert busy == 0
    # The engine reported no usage: the prompt estimate and the streamed tokens are charged.
    assert row.tokens_in == 4
    assert left.tokens == settings.budgets.default.tokens - (4 + 3)


@pytest.mark.req("ORCH-DATA-0032")
async def test_a_silent_engine_ends_the_task_with_decode_timeout_and_frees_the_slot(
    settings_for: SettingsFactory,
) -> None:
    hanging = {"ttft_ms": 1, "tokens_per_s": 0, "failure": {"mode": "hang", "after_tokens": 2}}
    raw = config(mock=hanging, decode_timeout_ms=50, slots_per_replica=1)
    async with running(settings_for(raw)) as run:
        task_id = run.submit(max_tokens=10)
        events = await until_end(run.scheduler.stream(task_id))
        row = run.row(task_id)
        busy = run.scheduler.registry.pools["default"].slots_busy

    assert [e.kind for e in events] == ["started", "token", "token", "error"]
    assert (events[-1].data["code"], events[-1].data["retriable"]) == ("DECODE_TIMEOUT", True)
    assert (row.state, row.error_code) == ("failed", "DECODE_TIMEOUT")
    assert busy == 0


@pytest.mark.req("ORCH-DATA-0060", "ORCH-DATA-0061")
async def test_a_canceled_queued_task_is_never_dispatched(settings_for: SettingsFactory) -> None:
    async with running(settings_for(config(mock=SLOW, slots_per_replica=1))) as run:
        busy_task = run.submit(max_tokens=8)
        queued = run.submit(max_tokens=8)

        run.scheduler.cancel(queued)
        run.scheduler.cancel(queued)  # idempotent
        events = await until_end(run.scheduler.stream(queued))
        row = run.row(queued)
        run.scheduler.cancel(busy_task)
        await until_end(run.scheduler.stream(busy_task))
        run.scheduler.cancel(busy_task)  # a task that ended: still fine
        with pytest.raises(TaskNotFound):
            run.scheduler.cancel("t-unknown")

    assert [(e.kind, e.data["finish_reason"]) for e in events] == [("end", "canceled")]
    assert (row.state, row.started_ms, row.replica_id) == ("canceled", None, None)


@pytest.mark.req("ORCH-DATA-0062", "ORCH-DATA-0082")
async def test_a_canceled_running_task_stops_without_another_token(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config(mock=SLOW))
    async with running(settings) as run:
        session_id = run.scheduler.sessions.create().row.session_id
        task_id = run.submit(session_id=session_id, max_tokens=20)
        stream = run.scheduler.stream(task_id)
        events: list[Event] = []
        published_at_cancel: int | None = None
        async with asyncio.timeout(5):
            async for event in stream.subscribe():
                assert event is not None
                events.append(event)
                if event.kind == "token" and published_at_cancel is None:
                    run.scheduler.cancel(task_id)
                    published_at_cancel = len(stream.events)
        row = run.row(task_id)
        left = run.scheduler.remaining(session_id)

    assert published_at_cancel is not None
    after = events[published_at_cancel:]
    assert [(e.kind, e.data["finish_reason"]) for e in after] == [("end", "canceled")]
    assert row.state == "canceled"
    streamed = sum(e.kind == "token" for e in events)
    assert row.tokens_out == streamed < 20
    assert left.tokens == settings.budgets.default.tokens - (4 + streamed)


@pytest.mark.req("ORCH-DATA-0051", "ORCH-DATA-0053")
async def test_a_stream_rebuilt_from_the_database_keeps_the_terminal_sequence_number(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for({**config(), "server": {"streams_retained": 0}})
    async with running(settings) as run:
        task_id = run.submit(max_tokens=5)
        live = await until_end(run.scheduler.stream(task_id))
        assert run.scheduler.registry.stream(task_id) is None  # nothing kept in memory

        rebuilt = run.scheduler.stream(task_id)
        attached = await until_end(rebuilt)
        resumed = [e async for e in rebuilt.subscribe(after=2) if e is not None]

    assert [(e.seq, e.kind) for e in live][-1] == (6, "end")
    # Whatever is replayed, the terminal frame keeps its id, so a resume after 2 still gets it.
    for replay in (attached, resumed):
        assert [(e.seq, e.kind) for e in replay][-1:] == [(6, "end")]
        assert replay[-1].data["tokens_out"] == 5


@pytest.mark.req("ORCH-DATA-0053")
async def test_tasks_in_flight_at_a_restart_end_with_worker_reset(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config())
    db = Database.open(settings.database_path, profile="test")
    try:
        lost = replace(
            task_row("t-lost", state="running"), request_json=json.dumps(task_body(max_tokens=50))
        )
        db.admit_task(lost, _session(), new_session=True)
    finally:
        db.close()

    async with running(settings) as run:
        row = run.row("t-lost")
        events = await until_end(run.scheduler.stream("t-lost"))

    assert (row.state, row.error_code, row.error_retriable) == ("failed", "WORKER_RESET", True)
    # Its events died with the process: the error comes under an id above any a client can have
    # seen (the task row's max_tokens bounds them), so a Last-Event-ID resume still reaches it.
    [event] = events
    assert (event.kind, event.data["code"]) == ("error", "WORKER_RESET")
    assert event.seq > 2 * 50


def _session() -> SessionRow:
    return SessionRow(
        session_id="s-1",
        created_ms=0,
        last_used_ms=0,
        ttl_ms=60_000,
        turns=1,
        max_turns=10,
        tokens_remaining=100,
        time_ms_remaining=100,
        cost_remaining=1.0,
    )


@pytest.mark.req("ORCH-DATA-0011", "ORCH-DATA-0030")
async def test_tasks_accepted_but_not_started_before_a_restart_run_after_it(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(config())
    db = Database.open(settings.database_path, profile="test")
    try:
        body = json.dumps(task_body(max_tokens=3), sort_keys=True)
        waiting = dataclasses.replace(task_row("t-waiting"), request_json=body)
        db.admit_task(waiting, _session(), new_session=True)
    finally:
        db.close()

    async with running(settings) as run:
        events = await until_end(run.scheduler.stream("t-waiting"))
        row = run.row("t-waiting")

    assert [e.kind for e in events] == ["started", "token", "token", "token", "end"]
    assert (row.state, row.tokens_out, row.error_code) == ("succeeded", 3, None)


def first_replica_fails_once_config() -> Mapping[str, Any]:
    """Two replicas, replica 0 failing before the first token, one retry. Replica order breaks
    the tie of two idle replicas: the failing replica 0 gets the first try."""
    failure = {"mode": "before_first_token", "replicas": [0]}
    failing = {"ttft_ms": 1, "tokens_per_s": 0, "failure": failure}
    order = {"tie_break": "replica_order"}
    return config(mock=failing, replicas=2, retry={"attempts": 2, "backoff_ms": 1}, placement=order)


async def test_a_failure_before_the_first_token_is_retried_on_another_replica(
    settings_for: SettingsFactory,
) -> None:
    raw = first_replica_fails_once_config()
    async with running(settings_for(raw)) as run:
        replicas = run.scheduler.registry.pools["default"].replicas
        session_id = run.scheduler.sessions.create().row.session_id
        task_id = run.submit(session_id=session_id, max_tokens=3)
        events = await until_end(run.scheduler.stream(task_id))
        row = run.row(task_id)
        session = run.scheduler.sessions.get(session_id)

    assert [e.kind for e in events] == ["started", "token", "token", "token", "end"]
    assert events[0].data["replica_id"] == "default-0"
    assert (row.state, row.replica_id) == ("succeeded", "default-1")
    assert session.row.last_replica_id == "default-1"
    assert [r.breaker.consecutive_failures for r in replicas] == [1, 0]


@pytest.mark.req("ORCH-STATE-0033")
async def test_a_retry_stays_on_its_replica_when_the_cluster_leases_every_slot_of_the_other(
    settings_for: SettingsFactory,
) -> None:
    raw = first_replica_fails_once_config()
    asked: list[tuple[str, str]] = []

    async def leased_elsewhere(record: TaskRecord, replica: Replica) -> bool:
        asked.append((record.task_id, replica.id))
        return False  # as the shared queue answers when other instances lease its slots

    async with running(settings_for(raw)) as run:
        run.scheduler.registry.pools["default"].move_slot = leased_elsewhere
        task_id = run.submit(max_tokens=3)
        events = await until_end(run.scheduler.stream(task_id))
        row = run.row(task_id)

    assert asked == [(task_id, "default-1")]
    assert [e.kind for e in events] == ["started", "error"]
    assert (row.state, row.replica_id) == ("failed", "default-0")


@pytest.mark.parametrize("attempts", [1, 2, 3])
async def test_a_task_stops_after_its_attempts(
    settings_for: SettingsFactory, attempts: int
) -> None:
    failing = {"ttft_ms": 1, "tokens_per_s": 0, "failure": {"mode": "before_first_token"}}
    retry = {"attempts": attempts, "backoff_ms": 1}
    raw = config(mock=failing, retry=retry, breaker={"failure_threshold": 10})
    async with running(settings_for(raw)) as run:
        task_id = run.submit(max_tokens=3)
        events = await until_end(run.scheduler.stream(task_id))
        row = run.row(task_id)
        replica = run.scheduler.registry.pools["default"].replicas[0]

    assert [e.kind for e in events] == ["started", "error"]
    assert (row.state, row.tokens_out) == ("failed", 0)
    assert replica.breaker.consecutive_failures == attempts
