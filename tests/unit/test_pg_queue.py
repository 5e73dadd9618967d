"""The shared queue's SQL (persistence/pg_queue.py) on a real PostgreSQL database: dispatch
order, capacity, victims, leases and the adoption of a dead instance (ORCH-STATE-0031 .. 0035)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import psycopg
import pytest

from llorch.errors import AdmissionReject, DeadlineUnmet, QueueFullDropLru
from llorch.persistence.pg_queue import Entry, PgQueue
from llorch.persistence.postgres import PostgresStorage
from llorch.persistence.rows import Reservation, SessionRow, TaskRow

POOL = "p"


@pytest.fixture
def stores(postgres_url: str) -> Iterator[tuple[PostgresStorage, PostgresStorage]]:
    a = PostgresStorage.open(postgres_url, profile="test", instance=("a", 60_000))
    b = PostgresStorage.open(postgres_url, profile="test", instance=("b", 60_000))
    yield a, b
    a.close()
    b.close()


def session(session_id: str) -> SessionRow:
    return SessionRow(session_id, 0, 0, 60_000, 0, 100, 10_000, 60_000, 10.0)


def task(task_id: str, priority: str = "interactive") -> TaskRow:
    return TaskRow(task_id, f"s-{task_id}", POOL, "m", priority, "queued", "{}", "d", "c", 0)


def admit(
    queue: PgQueue,
    task_id: str,
    *,
    flow: str = "",
    band: int = 0,
    capacity: int = 100,
    policy: str = "reject",
) -> TaskRow | None:
    positions: list[int] = []
    victim = queue.admit(
        task(task_id, ("interactive", "batch")[band]),
        session(f"s-{task_id}"),
        new_session=True,
        entry=Entry(POOL, band, flow),
        capacity=capacity,
        policy=policy,
        check=positions.append,
        reservation=Reservation(1, 1, 0.0),
    )
    return victim


def first(row: TaskRow, free: Mapping[str, int], affinity: str | None) -> str | None:
    return min(free)


def claim_all(queue: PgQueue, slots: int = 100, batch_every: int = 0) -> list[str]:
    claimed = []
    while (got := queue.claim(POOL, {"r0": slots}, first, batch_every)) is not None:
        claimed.append(got[0].task_id)
    return claimed


@pytest.mark.req("ORCH-STATE-0032")
def test_claims_go_band_first_then_least_served_flow_then_fifo(
    stores: tuple[PostgresStorage, PostgresStorage],
) -> None:
    a, b = stores
    for task_id, flow, band in [
        ("b1", "x", 1),
        ("x1", "x", 0),
        ("x2", "x", 0),
        ("x3", "x", 0),
        ("y1", "y", 0),
        ("y2", "y", 0),
    ]:
        admit(a.queue, task_id, flow=flow, band=band)

    assert claim_all(b.queue) == ["x1", "y1", "x2", "y2", "x3", "b1"]


@pytest.mark.req("ORCH-STATE-0032")
def test_batch_gets_its_guaranteed_share_while_interactive_waits(
    stores: tuple[PostgresStorage, PostgresStorage],
) -> None:
    a, b = stores
    for task_id, band in [("i1", 0), ("i2", 0), ("i3", 0), ("b1", 1), ("b2", 1)]:
        admit(a.queue, task_id, band=band)

    assert claim_all(b.queue, batch_every=2) == ["i1", "b1", "i2", "b2", "i3"]


@pytest.mark.req("ORCH-STATE-0031")
def test_a_full_queue_refuses_or_gives_up_its_heaviest_flows_oldest_task(
    stores: tuple[PostgresStorage, PostgresStorage],
) -> None:
    a, b = stores
    admit(a.queue, "x1", flow="x", capacity=3)
    admit(b.queue, "x2", flow="x", capacity=3)
    admit(a.queue, "y1", flow="y", capacity=3)

    with pytest.raises(AdmissionReject):
        admit(b.queue, "z1", flow="z", capacity=3)
    victim = admit(b.queue, "z1", flow="z", capacity=3, policy="drop-lru")
    with pytest.raises(QueueFullDropLru):  # a batch task displaces no interactive one
        admit(a.queue, "w1", flow="w", band=1, capacity=3, policy="drop-lru")

    assert victim is not None and victim.task_id == "x1"
    assert a.queue.depth(POOL) == 3
    assert a.queue.take("x1") is None  # out of the queue already: the admitter ends it


@pytest.mark.req("ORCH-STATE-0033")
def test_a_replicas_leases_count_for_every_instance_until_they_end(
    stores: tuple[PostgresStorage, PostgresStorage],
) -> None:
    a, b = stores
    for task_id in ("t1", "t2", "t3"):
        admit(a.queue, task_id)

    assert claim_all(a.queue, slots=1) == ["t1"]
    assert claim_all(b.queue, slots=1) == []
    b.finish_task("t1", {"state": "succeeded"}, "s-t1", {})
    assert claim_all(b.queue, slots=1) == ["t2"]
    b.queue.requeue("t2", Entry(POOL, 0, ""))
    assert claim_all(a.queue, slots=1) == ["t2"]


@pytest.mark.req("ORCH-STATE-0033")
def test_a_task_moves_its_lease_only_to_a_replica_with_a_slot_free_by_every_instance(
    stores: tuple[PostgresStorage, PostgresStorage], postgres_url: str
) -> None:
    a, b = stores
    for task_id in ("t1", "t2"):
        admit(a.queue, task_id)
    assert a.queue.claim(POOL, {"r0": 1}, lambda row, free, affinity: "r0") is not None  # t1 on r0
    assert b.queue.claim(POOL, {"r1": 1}, lambda row, free, affinity: "r1") is not None  # t2 on r1

    # r1's one slot is B's: A's task cannot move there; once B's task ends, it can.
    assert a.queue.move_lease("t1", POOL, "r1", 1) is False
    b.finish_task("t2", {"state": "succeeded"}, "s-t2", {})
    assert a.queue.move_lease("t1", POOL, "r1", 1) is True

    with psycopg.connect(postgres_url) as conn:
        leases = conn.execute("SELECT task_id, replica_id FROM slot_leases").fetchall()
    assert leases == [("t1", "r1")]


@pytest.mark.req("ORCH-STATE-0034")
def test_a_deadline_check_refuses_the_admission_in_its_transaction(
    stores: tuple[PostgresStorage, PostgresStorage],
) -> None:
    a, _ = stores

    def late(position: int) -> None:
        raise DeadlineUnmet(f"position {position} is too late")

    with pytest.raises(DeadlineUnmet):
        a.queue.admit(
            task("t1"),
            session("s-t1"),
            new_session=True,
            entry=Entry(POOL, 0, ""),
            capacity=10,
            policy="reject",
            reservation=Reservation(1, 1, 0.0),
            check=late,
        )

    assert a.get_task("t1") is None
    assert a.queue.depth(POOL) == 0


@pytest.mark.req("ORCH-STATE-0035")
def test_one_survivor_adopts_a_dead_instances_running_tasks_and_leaves_its_queue(
    stores: tuple[PostgresStorage, PostgresStorage], postgres_url: str
) -> None:
    a, b = stores
    for task_id in ("t1", "t2"):
        admit(a.queue, task_id)
    assert claim_all(a.queue, slots=1) == ["t1"]
    a.close()  # its heartbeat stops
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE instances SET heartbeat_ms = 0 WHERE instance_id = 'a'")

    adopted = [r.task_id for r in b.queue.adopt_dead()]
    again = b.queue.adopt_dead()

    assert adopted == ["t1"]
    assert again == []
    assert claim_all(b.queue, slots=1) == ["t2"]  # A's lease is gone with it


@pytest.mark.req("ORCH-STATE-0036")
def test_a_start_or_a_checkpoint_written_after_the_end_leaves_the_end_alone(
    stores: tuple[PostgresStorage, PostgresStorage],
) -> None:
    # Off the event loop a task's start and its end are written by different threads: a cancel
    # while the start is in flight may commit the end first.
    a, _ = stores
    admit(a.queue, "t1")
    assert claim_all(a.queue, slots=1) == ["t1"]
    a.finish_task("t1", {"state": "canceled", "finish_reason": "canceled"}, "s-t1", {})

    a.place_task("t1", "s-t1", pool_id=POOL, replica_id="r0", state="running", started_ms=5)
    a.record_progress([("t1", 7)], now_ms=9)

    row = a.get_task("t1")
    assert row is not None
    assert (row.state, row.started_ms, row.tokens_out, row.progress_ms) == (
        "canceled",
        None,
        0,
        None,
    )
