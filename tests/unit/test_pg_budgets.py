"""Session reservations held in PostgreSQL (persistence.pg_budgets): taken under the session
row's lock in the admission transaction, released and charged once by the task's end."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from llorch.errors import BudgetExhausted
from llorch.persistence import EndedElsewhere, Reservation
from llorch.persistence.postgres import PostgresStorage
from tests.unit.helpers import task_row
from tests.unit.test_db import session_row

WANT = Reservation(tokens=400, time_ms=1_000, cost=0.5)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStorage]:
    opened = PostgresStorage.open(postgres_url, profile="test")
    yield opened
    opened.close()


def held(url: str, task_id: str) -> tuple[object, ...] | None:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT reserved_tokens, reserved_time_ms, reserved_cost FROM tasks WHERE task_id = %s",
            (task_id,),
        ).fetchone()


@pytest.mark.req("ORCH-STATE-0050", "ORCH-STATE-0051")
def test_a_reservation_is_held_on_the_session_and_the_task_and_read_as_spent(
    store: PostgresStorage, postgres_url: str
) -> None:
    store.admit_task(task_row("t-1"), session_row(turns=1), new_session=True, reservation=WANT)
    store.admit_task(task_row("t-2"), session_row(), new_session=False, reservation=WANT)

    row = store.get_session("s-1")
    assert row is not None
    assert (row.turns, row.tokens_remaining, row.time_ms_remaining) == (2, 200, 8_000)
    assert row.cost_remaining == pytest.approx(0.5)
    assert held(postgres_url, "t-1") == (400, 1_000, 0.5)


@pytest.mark.req("ORCH-STATE-0050")
def test_a_task_that_does_not_fit_is_refused_and_nothing_is_written(
    store: PostgresStorage, postgres_url: str
) -> None:
    store.admit_task(task_row("t-1"), session_row(turns=1), new_session=True, reservation=WANT)
    store.admit_task(task_row("t-2"), session_row(), new_session=False, reservation=WANT)

    with pytest.raises(BudgetExhausted) as refused:
        store.admit_task(task_row("t-3"), session_row(), new_session=False, reservation=WANT)
    assert refused.value.policy_label == "tokens"
    assert store.get_task("t-3") is None
    row = store.get_session("s-1")
    assert row is not None and (row.turns, row.tokens_remaining) == (2, 200)


@pytest.mark.req("ORCH-STATE-0050")
def test_the_turn_is_counted_under_the_lock(store: PostgresStorage) -> None:
    store.insert_session(session_row(turns=1, max_turns=2))
    small = Reservation(1, 1, 0.0)
    store.admit_task(task_row("t-1"), session_row(), new_session=False, reservation=small)

    with pytest.raises(BudgetExhausted) as refused:
        store.admit_task(task_row("t-2"), session_row(), new_session=False, reservation=small)
    assert refused.value.policy_label == "turns"


@pytest.mark.req("ORCH-STATE-0051", "ORCH-STATE-0038")
def test_an_end_releases_the_reservation_and_charges_once_however_often_it_is_recorded(
    store: PostgresStorage, postgres_url: str
) -> None:
    store.admit_task(task_row("t-1"), session_row(turns=1), new_session=True, reservation=WANT)
    used = Reservation(tokens=150, time_ms=300, cost=0.25)

    overrun = store.finish_task("t-1", {"state": "succeeded"}, "s-1", {}, used=used)
    assert overrun is None
    # A sweep that found it again: nothing more is charged, and the stored end is told.
    with pytest.raises(EndedElsewhere) as elsewhere:
        store.finish_task("t-1", {"state": "failed"}, "s-1", {}, used=used)
    assert (elsewhere.value.row.task_id, elsewhere.value.row.state) == ("t-1", "succeeded")

    row = store.get_session("s-1")
    assert row is not None
    assert (row.tokens_remaining, row.time_ms_remaining) == (850, 9_700)
    assert row.cost_remaining == pytest.approx(1.25)
    assert held(postgres_url, "t-1") == (None, None, None)


@pytest.mark.req("ORCH-STATE-0051")
def test_an_end_is_charged_no_more_than_the_other_reservations_leave(
    store: PostgresStorage,
) -> None:
    store.admit_task(task_row("t-1"), session_row(turns=1), new_session=True, reservation=WANT)
    store.admit_task(task_row("t-2"), session_row(), new_session=False, reservation=WANT)
    used = Reservation(tokens=700, time_ms=0, cost=0.0)

    overrun = store.finish_task("t-1", {"state": "succeeded"}, "s-1", {}, used=used)

    # 1000 committed, t-2 holds 400: t-1 may be charged 600, its other 100 tokens are overrun.
    assert overrun == Reservation(tokens=100, time_ms=0, cost=0.0)
    row = store.get_session("s-1")
    assert row is not None and row.tokens_remaining == 0
    store.finish_task("t-2", {"state": "canceled"}, "s-1", {}, used=Reservation(0, 0, 0.0))
    row = store.get_session("s-1")
    assert row is not None and row.tokens_remaining == 400
