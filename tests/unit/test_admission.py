"""Admission through the real Scheduler, database and sessions, with the dispatcher not started.

Replicas are marked ready by hand and nothing is dispatched, so queued tasks stay queued and the
queue can be filled deterministically.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from llorch.clock import FakeClock
from llorch.config import Settings
from llorch.errors import (
    AdmissionReject,
    BudgetExhausted,
    DeadlineUnmet,
    InvalidParams,
    PoolUnavailable,
    PoolUnready,
    QueueFullDropLru,
    SessionNotFound,
    StorageError,
    TaskExists,
)
from llorch.persistence import Database
from llorch.scheduler import Admission, Scheduler
from llorch.scheduler.pools import PoolRuntime
from llorch.sessions import SessionService
from tests.conftest import SettingsFactory
from tests.support import pool, task_body

# "tell me a story" is 15 bytes: admission reserves at most a token a byte and 8 for the
# markers, 23 prompt tokens.
PROMPT_TOKENS = 23


@dataclass
class Rig:
    settings: Settings
    scheduler: Scheduler
    db: Database
    clock: FakeClock

    def pool(self, pool_id: str = "default") -> PoolRuntime:
        return self.scheduler.registry.pools[pool_id]

    def submit(self, **overrides: Any) -> Admission:
        return self.scheduler.admit(task_body(**overrides), "c-1")

    def task_count(self) -> int:
        rows = self.db.list_tasks(session_id=None, state=None, limit=1000, before_seq=None)
        return len(rows)


RigFactory = Callable[..., Rig]


@pytest.fixture
def rig_for(settings_for: SettingsFactory) -> Iterator[RigFactory]:
    opened: list[Database] = []

    def build(
        raw: Mapping[str, Any] | None = None,
        *,
        unready: tuple[str, ...] = (),
        busy_timeout_ms: int = 5000,
    ) -> Rig:
        settings = settings_for(raw or {"pools": [pool()]})
        db = Database.open(settings.database_path, profile="test", busy_timeout_ms=busy_timeout_ms)
        opened.append(db)
        clock = FakeClock()
        scheduler = Scheduler(settings, db, SessionService(db, settings, clock), clock)
        for runtime in scheduler.registry.pools.values():
            for replica in runtime.replicas:
                replica.ready = runtime.id not in unready
        return Rig(settings, scheduler, db, clock)

    yield build
    for db in opened:
        db.close()


def one_slot(**overrides: Any) -> dict[str, Any]:
    return {"pools": [pool(replicas=1, slots_per_replica=1, **overrides)]}


@pytest.mark.req("ORCH-DATA-0010", "ORCH-DATA-0011", "ORCH-DATA-0012", "ORCH-DATA-0081")
async def test_an_accepted_task_is_persisted_queued_and_reserved(rig_for: RigFactory) -> None:
    rig = rig_for()

    admitted = rig.submit(max_tokens=8)

    assert (admitted.state, admitted.pool_id, admitted.queue_position) == ("queued", "default", 0)
    assert (admitted.predicted_start_ms, admitted.backoff_ms) == (rig.clock.now_ms(), 0)
    row = rig.db.get_task(admitted.task_id)
    assert row is not None
    assert (row.state, row.session_id, row.correlation_id) == ("queued", admitted.session_id, "c-1")
    session = rig.scheduler.sessions.get(admitted.session_id)
    assert session.row.turns == 1
    default = rig.settings.budgets.default
    assert session.row.tokens_remaining == default.tokens
    # What the client can still spend already excludes the task's worst case.
    assert admitted.remaining.tokens == default.tokens - (PROMPT_TOKENS + 8)
    assert admitted.remaining == session.remaining
    assert list(rig.pool().queue) == [rig.scheduler.registry.live[admitted.task_id]]


@pytest.mark.req("ORCH-DATA-0020", "ORCH-DATA-0024")
async def test_positions_and_predicted_starts_follow_the_queue_and_the_drain_rate(
    rig_for: RigFactory,
) -> None:
    rig = rig_for(one_slot(queue={"capacity": 10}))
    runtime = rig.pool()

    first = rig.submit()
    second = rig.submit()
    batch = rig.submit(priority="batch")
    late_interactive = rig.submit()

    positions = [a.queue_position for a in (first, second, batch, late_interactive)]
    assert positions == [0, 1, 2, 2]
    # The batch task was overtaken by the interactive task that came after it.
    batch_record = rig.scheduler.registry.live[batch.task_id]
    assert runtime.queue.position(batch_record, "batch") == 3
    interval_ms = runtime.drain_interval_s() * 1000
    assert first.backoff_ms == 0  # a free slot waits for it
    assert second.backoff_ms == pytest.approx(interval_ms, abs=1)
    assert late_interactive.backoff_ms == pytest.approx(2 * interval_ms, abs=1)
    assert second.predicted_start_ms == rig.clock.now_ms() + second.backoff_ms

    for _ in range(60):
        runtime.meter.record(service_s=5.0, ttft_s=None, tokens=0, decode_s=0.0)
    slower = rig.submit()
    assert slower.queue_position == 3
    assert slower.backoff_ms == pytest.approx(3 * 5000, abs=2)


@pytest.mark.req("ORCH-DATA-0021", "ORCH-DATA-0024", "ORCH-DATA-0025")
async def test_a_full_reject_queue_accepts_exactly_its_capacity(rig_for: RigFactory) -> None:
    rig = rig_for(one_slot(queue={"capacity": 3, "policy": "reject"}))

    accepted, rejected = [], []
    for _ in range(7):
        try:
            accepted.append(rig.submit())
        except AdmissionReject as exc:
            rejected.append(exc)

    assert (len(accepted), len(rejected)) == (3, 4)
    assert rig.task_count() == 3
    assert len(rig.scheduler.registry.live) == 3
    advice = rig.pool().retry_after()
    for refusal in rejected:
        assert (refusal.retry_after_ms, refusal.pool_id, refusal.policy_label) == (
            advice[1],
            "default",
            "reject",
        )

    for _ in range(60):
        rig.pool().meter.record(service_s=9.0, ttft_s=None, tokens=0, decode_s=0.0)
    with pytest.raises(AdmissionReject) as caught:
        rig.submit()
    assert caught.value.retry_after_ms == pytest.approx(9000, abs=2)


@pytest.mark.req("ORCH-DATA-0022", "ORCH-DATA-0023")
async def test_drop_lru_drops_the_oldest_lower_priority_task(rig_for: RigFactory) -> None:
    rig = rig_for(one_slot(queue={"capacity": 2, "policy": "drop-lru"}))
    batch = rig.submit(priority="batch")
    first = rig.submit()

    newcomer = rig.submit()

    assert newcomer.queue_position == 1
    dropped = rig.db.get_task(batch.task_id)
    assert dropped is not None
    assert (dropped.state, dropped.error_code, dropped.error_retriable) == (
        "failed",
        "QUEUE_FULL_DROP_LRU",
        True,
    )
    stream = rig.scheduler.stream(batch.task_id)
    assert stream.events == []  # its terminal frame waits for the commit to be durable
    await rig.scheduler.durable()
    assert [(e.kind, e.data["code"]) for e in stream.events] == [("error", "QUEUE_FULL_DROP_LRU")]
    assert stream.closed
    assert [r.task_id for r in rig.pool().queue] == [first.task_id, newcomer.task_id]
    # The dropped task holds no reservation any more and was charged nothing.
    assert rig.scheduler.remaining(batch.session_id).tokens == rig.settings.budgets.default.tokens
    assert batch.task_id not in rig.scheduler.registry.live

    # Only interactive tasks are left: a batch newcomer is refused.
    with pytest.raises(QueueFullDropLru) as caught:
        rig.submit(priority="batch")
    assert caught.value.retry_after_ms == rig.pool().retry_after()[1]
    assert caught.value.pool_id == "default"
    assert rig.task_count() == 3


@pytest.mark.req("ORCH-DATA-0022", "ORCH-DATA-0082")
async def test_a_dropped_task_releases_its_reservation(rig_for: RigFactory) -> None:
    rig = rig_for(one_slot(queue={"capacity": 1, "policy": "drop-lru"}))
    session_id = rig.scheduler.sessions.create(tokens=100).row.session_id
    rig.submit(session_id=session_id, max_tokens=20)
    assert rig.scheduler.remaining(session_id).tokens == 100 - (PROMPT_TOKENS + 20)

    rig.submit(session_id=session_id, max_tokens=10)

    # Only the newcomer's worst case is held; the victim never ran and spent nothing.
    assert rig.scheduler.remaining(session_id).tokens == 100 - (PROMPT_TOKENS + 10)


@pytest.mark.req("ORCH-DATA-0080")
async def test_a_task_the_session_cannot_afford_is_refused_before_it_is_queued(
    rig_for: RigFactory,
) -> None:
    rig = rig_for()
    session_id = rig.scheduler.sessions.create(tokens=10).row.session_id

    with pytest.raises(BudgetExhausted) as caught:
        rig.submit(session_id=session_id, max_tokens=8)

    assert (caught.value.policy_label, caught.value.retriable) == ("tokens", False)
    assert caught.value.retry_after_ms is not None and caught.value.retry_after_ms >= 1
    assert len(rig.pool().queue) == 0
    assert rig.task_count() == 0
    assert rig.scheduler.sessions.get(session_id).row.turns == 0


@pytest.mark.req("ORCH-DATA-0081")
async def test_reservations_stop_concurrent_tasks_from_overspending(rig_for: RigFactory) -> None:
    rig = rig_for()
    budget = 2 * (PROMPT_TOKENS + 8) + 10
    session_id = rig.scheduler.sessions.create(tokens=budget).row.session_id

    rig.submit(session_id=session_id, max_tokens=8)
    rig.submit(session_id=session_id, max_tokens=8)
    with pytest.raises(BudgetExhausted):
        rig.submit(session_id=session_id, max_tokens=8)

    assert rig.scheduler.remaining(session_id).tokens == 10
    assert rig.task_count() == 2


@pytest.mark.req("ORCH-DATA-0014")
async def test_a_deadline_that_cannot_be_met_is_refused_and_not_queued(
    rig_for: RigFactory,
) -> None:
    # 100 ms to the first token, then 1000 tokens/s: a task alone ends after ~108 ms.
    rig = rig_for(one_slot(mock={"ttft_ms": 100, "tokens_per_s": 1000}))

    with pytest.raises(DeadlineUnmet) as caught:
        rig.submit(deadline_ms=50)
    assert caught.value.pool_id == "default"
    assert rig.task_count() == 0

    # A place frees every ~164 ms (100 ms + 64 typical tokens): five tasks fit in 800 ms...
    for _ in range(5):
        rig.submit(deadline_ms=800)
    # ...but a sixth would wait 5 x 164 ms before it even starts.
    with pytest.raises(DeadlineUnmet):
        rig.submit(deadline_ms=800)
    assert len(rig.pool().queue) == 5


@pytest.mark.req("ORCH-DATA-0018")
async def test_a_pinned_pool_without_ready_replicas_does_not_fall_back(
    rig_for: RigFactory,
) -> None:
    rig = rig_for({"pools": [pool(id="a"), pool(id="b")]}, unready=("a",))

    with pytest.raises(PoolUnready) as caught:
        rig.submit(placement={"pin_pool_id": "a"})
    assert caught.value.pool_id == "a"
    assert caught.value.retriable is True
    assert caught.value.retry_after_ms is not None and caught.value.retry_after_ms > 0

    assert rig.submit().pool_id == "b"
    assert rig.submit(placement={"pin_pool_id": "b"}).pool_id == "b"


@pytest.mark.req("ORCH-DATA-0018")
async def test_no_ready_replica_and_draining_pools_are_unavailable(rig_for: RigFactory) -> None:
    rig = rig_for(unready=("default",))
    with pytest.raises(PoolUnready):
        rig.submit()

    rig = rig_for()
    rig.pool().draining = True
    with pytest.raises(PoolUnavailable):
        rig.submit()
    assert rig.task_count() == 0


@pytest.mark.req("ORCH-DATA-0013", "ORCH-DATA-0091")
@pytest.mark.parametrize(
    "overrides",
    [
        {"model": "no-such-model"},
        {"max_tokens": 65},
        {"max_tokens": 60, "prompt": "x" * 40},  # ~10 prompt tokens + 60 > context of 64
        {"placement": {"pin_pool_id": "nowhere"}},
    ],
)
async def test_requests_outside_the_models_limits_are_invalid(
    rig_for: RigFactory, overrides: dict[str, Any]
) -> None:
    rig = rig_for({"pools": [pool(max_context=64, max_tokens_out=64)]})

    with pytest.raises(InvalidParams):
        rig.submit(**overrides)
    assert rig.task_count() == 0


@pytest.mark.req("ORCH-DATA-0015")
async def test_an_unknown_or_expired_session_is_not_found(rig_for: RigFactory) -> None:
    rig = rig_for()
    with pytest.raises(SessionNotFound):
        rig.submit(session_id="s-unknown")

    session = rig.scheduler.sessions.create(ttl_ms=1000)
    rig.clock.advance(1000)
    with pytest.raises(SessionNotFound):
        rig.submit(session_id=session.row.session_id)
    assert rig.task_count() == 0


@pytest.mark.req("ORCH-DATA-0016")
async def test_a_resubmitted_task_id_answers_the_same_task_once(rig_for: RigFactory) -> None:
    rig = rig_for()
    first = rig.submit(task_id="t-fixed")

    again = rig.submit(task_id="t-fixed")

    assert (again.task_id, again.session_id, again.state) == ("t-fixed", first.session_id, "queued")
    assert again.queue_position == first.queue_position
    assert rig.task_count() == 1
    assert len(rig.pool().queue) == 1
    with pytest.raises(TaskExists):
        rig.submit(task_id="t-fixed", max_tokens=9)
    assert rig.task_count() == 1


@pytest.mark.req("ORCH-DATA-0019")
async def test_a_storage_failure_leaves_no_half_admitted_task(rig_for: RigFactory) -> None:
    rig = rig_for(busy_timeout_ms=50)
    session_id = rig.scheduler.sessions.create(tokens=1000).row.session_id
    other = sqlite3.connect(rig.settings.database_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageError):
            rig.submit()  # with a new session
        with pytest.raises(StorageError):
            rig.submit(session_id=session_id, task_id="t-locked")
        other.execute("ROLLBACK")
    finally:
        other.close()

    assert rig.task_count() == 0
    assert rig.db.get_task("t-locked") is None
    assert len(rig.pool().queue) == 0
    assert rig.scheduler.registry.live == {}
    session = rig.scheduler.sessions.get(session_id)
    assert session.row.turns == 0
    assert session.remaining.tokens == 1000  # no reservation was left behind
    # With the lock gone the same task is admitted normally.
    assert rig.submit(session_id=session_id, task_id="t-locked").state == "queued"
