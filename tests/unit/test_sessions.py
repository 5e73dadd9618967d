"""SessionService on a real database and a fake clock: caps, TTL from last use, budgets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llorch.clock import FakeClock
from llorch.config import Budget, BudgetSettings, SessionSettings, Settings
from llorch.errors import BudgetExhausted, SessionNotFound
from llorch.persistence import Database, SessionRow
from llorch.sessions import Reservation, SessionService, Settled
from llorch.sessions.service import Remaining
from tests.unit.helpers import task_row

SETTINGS = Settings(
    sessions=SessionSettings(ttl_ms=60_000, max_ttl_ms=120_000, max_turns=3),
    budgets=BudgetSettings(
        default=Budget(tokens=1_000, time_ms=10_000, cost=1.0),
        max=Budget(tokens=5_000, time_ms=50_000, cost=5.0),
    ),
)
SMALL = Reservation(tokens=10, time_ms=100, cost=0.01)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    opened = Database.open(tmp_path / "llorch-test.sqlite3", profile="test")
    yield opened
    opened.close()


@pytest.fixture
def sessions(db: Database, clock: FakeClock) -> SessionService:
    return SessionService(db, SETTINGS, clock)


def use(sessions: SessionService, db: Database, session_id: str, task_id: str) -> SessionRow:
    """Admit one task in the session the way admission does: check, then persist the use."""
    used = sessions.check_use(sessions.live_row(session_id), SMALL)
    db.admit_task(task_row(task_id, session_id=session_id), used, new_session=False)
    return used


@pytest.mark.req("ORCH-DATA-0012", "ORCH-DATA-0070")
def test_a_session_created_without_requests_gets_the_defaults(
    sessions: SessionService, clock: FakeClock
) -> None:
    session = sessions.create()

    row = session.row
    assert row.session_id.startswith("s-")
    assert (row.created_ms, row.last_used_ms) == (clock.now_ms(), clock.now_ms())
    assert (row.ttl_ms, row.turns, row.max_turns) == (60_000, 0, 3)
    assert session.remaining == Remaining(tokens=1_000, time_ms=10_000, cost=1.0)
    assert session.ttl_ms_remaining == 60_000
    assert sessions.get(row.session_id).row == row


@pytest.mark.req("ORCH-DATA-0070")
def test_create_caps_budgets_and_ttl_at_the_policy_maximum(sessions: SessionService) -> None:
    session = sessions.create(ttl_ms=10**9, tokens=10**9, time_ms=10**9, cost=10**6)

    assert session.row.ttl_ms == 120_000
    assert session.remaining == Remaining(tokens=5_000, time_ms=50_000, cost=5.0)
    stored = sessions.get(session.row.session_id).row
    assert (stored.tokens_remaining, stored.time_ms_remaining, stored.cost_remaining) == (
        5_000,
        50_000,
        5.0,
    )


@pytest.mark.req("ORCH-DATA-0070")
def test_create_keeps_requests_below_the_policy_maximum(sessions: SessionService) -> None:
    session = sessions.create(ttl_ms=90_000, max_turns=2, tokens=4_000, time_ms=0, cost=0.25)

    assert (session.row.ttl_ms, session.row.max_turns) == (90_000, 2)
    assert session.remaining == Remaining(tokens=4_000, time_ms=0, cost=0.25)


@pytest.mark.req("ORCH-DATA-0070")
def test_create_caps_the_turn_cap_at_the_policy_maximum(sessions: SessionService) -> None:
    # The server's policy allows 3 turns per session (sessions.max_turns).
    session = sessions.create(max_turns=50)

    assert session.row.max_turns == 3


@pytest.mark.req("ORCH-DATA-0071", "ORCH-DATA-0072")
def test_the_ttl_counts_from_the_last_use(
    sessions: SessionService, db: Database, clock: FakeClock
) -> None:
    session_id = sessions.create().row.session_id

    clock.advance(59_999)
    assert sessions.get(session_id).ttl_ms_remaining == 1
    use(sessions, db, session_id, "t-1")

    # More than the TTL since creation, less since the last use: still alive.
    clock.advance(59_999)
    alive = sessions.get(session_id)
    assert alive.ttl_ms_remaining == 1
    assert alive.row.turns == 1

    clock.advance(1)
    with pytest.raises(SessionNotFound) as caught:
        sessions.get(session_id)
    assert caught.value.code == "SESSION_NOT_FOUND"
    with pytest.raises(SessionNotFound):
        sessions.live_row(session_id)


@pytest.mark.req("ORCH-DATA-0071", "ORCH-DATA-0072")
def test_reading_a_session_is_not_a_use(sessions: SessionService, clock: FakeClock) -> None:
    session_id = sessions.create().row.session_id

    clock.advance(30_000)
    sessions.get(session_id)
    clock.advance(30_000)

    with pytest.raises(SessionNotFound):
        sessions.get(session_id)


@pytest.mark.req("ORCH-DATA-0015", "ORCH-DATA-0071")
def test_unknown_and_deleted_sessions_are_not_found(
    sessions: SessionService,
) -> None:
    with pytest.raises(SessionNotFound):
        sessions.get("s-unknown")
    session_id = sessions.create().row.session_id
    sessions.reserve(session_id, "t-1", SMALL)

    sessions.delete(session_id)

    with pytest.raises(SessionNotFound):
        sessions.get(session_id)
    with pytest.raises(SessionNotFound):
        sessions.delete(session_id)
    assert sessions.remaining_for(session_id) == Remaining(0, 0, 0.0)


@pytest.mark.req("ORCH-DATA-0072")
def test_a_session_out_of_turns_is_refused_with_policy_label_turns(
    sessions: SessionService, db: Database
) -> None:
    session_id = sessions.create().row.session_id
    for i in range(3):
        assert use(sessions, db, session_id, f"t-{i}").turns == i + 1

    with pytest.raises(BudgetExhausted) as caught:
        sessions.check_use(sessions.live_row(session_id), SMALL)

    assert caught.value.policy_label == "turns"
    assert caught.value.code == "BUDGET_EXHAUSTED"
    assert caught.value.retriable is False


@pytest.mark.req("ORCH-DATA-0080")
@pytest.mark.parametrize(
    ("want", "label"),
    [
        (Reservation(tokens=1_001, time_ms=0, cost=0.0), "tokens"),
        (Reservation(tokens=0, time_ms=10_001, cost=0.0), "time"),
        (Reservation(tokens=0, time_ms=0, cost=1.01), "cost"),
    ],
)
def test_a_task_that_does_not_fit_is_refused_with_the_budget_it_exceeds(
    sessions: SessionService, want: Reservation, label: str
) -> None:
    row = sessions.create().row

    with pytest.raises(BudgetExhausted) as caught:
        sessions.check_use(row, want)

    assert caught.value.policy_label == label
    assert caught.value.retriable is False


@pytest.mark.req("ORCH-DATA-0080")
def test_a_task_that_fits_exactly_is_accepted_as_one_more_turn(
    sessions: SessionService, clock: FakeClock
) -> None:
    row = sessions.create().row
    clock.advance(5)

    used = sessions.check_use(row, Reservation(tokens=1_000, time_ms=10_000, cost=1.0))

    assert (used.turns, used.last_used_ms) == (1, row.last_used_ms + 5)
    # check_use only computes the new row; it writes nothing.
    assert sessions.get(row.session_id).row.turns == 0


@pytest.mark.req("ORCH-DATA-0081")
def test_open_reservations_reduce_what_a_session_can_spend(sessions: SessionService) -> None:
    row = sessions.create().row
    sid = row.session_id

    sessions.reserve(sid, "t-1", Reservation(tokens=400, time_ms=2_000, cost=0.3))
    sessions.reserve(sid, "t-2", Reservation(tokens=100, time_ms=1_000, cost=0.2))

    assert sessions.remaining(row) == Remaining(tokens=500, time_ms=7_000, cost=0.5)
    assert sessions.get(sid).remaining == Remaining(tokens=500, time_ms=7_000, cost=0.5)
    # A third task that would fit the committed budget alone cannot overspend it.
    with pytest.raises(BudgetExhausted) as caught:
        sessions.check_use(row, Reservation(tokens=600, time_ms=0, cost=0.0))
    assert caught.value.policy_label == "tokens"

    sessions.release(sid, "t-1")
    assert sessions.remaining(row) == Remaining(tokens=900, time_ms=9_000, cost=0.8)
    sessions.check_use(row, Reservation(tokens=600, time_ms=0, cost=0.0))

    sessions.release(sid, "t-2")
    sessions.release(sid, "t-2")  # releasing twice is harmless
    sessions.release(sid, "t-unknown")
    assert sessions.remaining(row) == Remaining(tokens=1_000, time_ms=10_000, cost=1.0)


@pytest.mark.req("ORCH-DATA-0081")
def test_remaining_never_goes_below_zero(sessions: SessionService) -> None:
    row = sessions.create().row
    sessions.reserve(row.session_id, "t-1", Reservation(tokens=5_000, time_ms=50_000, cost=9.0))

    assert sessions.remaining(row) == Remaining(tokens=0, time_ms=0, cost=0.0)


@pytest.mark.req("ORCH-DATA-0082", "ORCH-DATA-0084")
def test_settle_charges_usage_up_to_what_the_session_has_beside_other_reservations(
    sessions: SessionService,
) -> None:
    sid = sessions.create().row.session_id  # 1,000 tokens, 10 s, cost 1.0
    sessions.reserve(sid, "t-1", Reservation(tokens=300, time_ms=2_000, cost=0.2))
    sessions.reserve(sid, "t-2", Reservation(tokens=400, time_ms=3_000, cost=0.3))

    within = sessions.settle(sid, "t-1", Reservation(tokens=250, time_ms=1_500, cost=0.1))
    assert within.values == {
        "tokens_remaining": 750,
        "time_ms_remaining": 8_500,
        "cost_remaining": 0.9,
    }
    assert within.overrun is None

    # t-2 uses far more than it reserved: it may take what no other open task holds, no more
    # (t-1's values are not stored here: the caller stores them with the task's final row).
    sessions.reserve(sid, "t-3", Reservation(tokens=100, time_ms=1_000, cost=0.1))
    beyond = sessions.settle(sid, "t-2", Reservation(tokens=2_000, time_ms=20_000, cost=3.0))
    assert beyond.overrun == Reservation(tokens=2_000 - 900, time_ms=20_000 - 9_000, cost=2.1)
    assert beyond.values["tokens_remaining"] == 100  # t-3's reservation stays backed
    assert sessions.settle("s-unknown", "t-9", Reservation(1, 1, 0.0)) == Settled({}, None)


def test_settle_charges_from_the_row_the_admission_kept_and_reads_it_once_dropped(
    sessions: SessionService, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = sessions.create().row.session_id  # 1,000 tokens, 10 s, cost 1.0
    reads: list[str] = []
    read = db.get_session

    def counted(session_id: str) -> SessionRow | None:
        reads.append(session_id)
        return read(session_id)

    monkeypatch.setattr(db, "get_session", counted)
    # Two tasks admitted in the session, each keeping the row its admission stored.
    for task_id in ("t-1", "t-2"):
        sessions.reserve(
            task_id=task_id, session_id=sid, amount=SMALL, row=use(sessions, db, sid, task_id)
        )
    reads.clear()

    first = sessions.settle(sid, "t-1", Reservation(tokens=100, time_ms=1_000, cost=0.1))
    assert reads == []  # charged from the kept row
    assert first.values == {
        "tokens_remaining": 900,
        "time_ms_remaining": 9_000,
        "cost_remaining": 0.9,
    }
    db.finish_task("t-1", {"state": "succeeded"}, sid, first.values)

    # Its charge dropped the row: the next end reads the committed one, the first charge in it.
    second = sessions.settle(sid, "t-2", Reservation(tokens=50, time_ms=500, cost=0.05))
    assert reads == [sid]
    assert second.values == {
        "tokens_remaining": 850,
        "time_ms_remaining": 8_500,
        "cost_remaining": 0.85,
    }


def test_remaining_for_sees_every_commit_and_delete_of_a_session_with_open_tasks(
    sessions: SessionService, db: Database
) -> None:
    sid = sessions.create().row.session_id
    sessions.reserve(sid, "t-1", SMALL)
    sessions.reserve(sid, "t-2", SMALL)
    assert sessions.remaining_for(sid) == Remaining(tokens=980, time_ms=9_800, cost=0.98)

    # t-1 ends: its reservation released, its usage committed (as Dispatcher._settle does).
    db.admit_task(task_row("t-1", session_id=sid), sessions.live_row(sid), new_session=False)
    settled = sessions.settle(sid, "t-1", Reservation(tokens=100, time_ms=1_000, cost=0.1))
    db.finish_task("t-1", {"state": "succeeded"}, sid, settled.values)
    assert sessions.remaining_for(sid) == Remaining(tokens=890, time_ms=8_900, cost=0.89)
    assert sessions.remaining_for(sid) == sessions.remaining(sessions.live_row(sid))

    sessions.delete(sid)
    assert sessions.remaining_for(sid) == Remaining(0, 0, 0.0)


def test_remaining_for_a_session_without_open_tasks_reads_the_database(
    sessions: SessionService, db: Database
) -> None:
    sid = sessions.create().row.session_id
    assert sessions.remaining_for(sid) == Remaining(tokens=1_000, time_ms=10_000, cost=1.0)

    db.finish_task("t-none", {"state": "succeeded"}, sid, {"tokens_remaining": 400})

    assert sessions.remaining_for(sid).tokens == 400
    sessions.reserve(sid, "t-1", SMALL)
    assert sessions.remaining_for(sid).tokens == 390
    sessions.release(sid, "t-1")
    db.finish_task("t-none", {"state": "succeeded"}, sid, {"tokens_remaining": 300})
    assert sessions.remaining_for(sid).tokens == 300
