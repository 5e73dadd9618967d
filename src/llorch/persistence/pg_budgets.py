"""Session budgets held in PostgreSQL, so that several instances never overspend one session
(ORCH-STATE-0050, ORCH-STATE-0051).

A session row keeps its *committed* remainder (``tokens_remaining`` …) and the sum of its open
reservations (``tokens_reserved`` …); a task row keeps its own reservation (``reserved_tokens``
…, NULL once released). Both change only under the session row's lock (``SELECT … FOR
UPDATE``), taken first in every transaction here (then the task row's), so concurrent
admissions and ends on one session are serialised and never deadlock with each other:

* :func:`reserve` and :func:`hold_on_task` (the admission transaction): the turn and the
  feasibility check against committed minus reserved, the session's reserved sums, then the
  task's own reservation;
* :func:`settle` (the transaction of ``finish_task``, the one path every end takes): the task's
  reservation released and its usage charged, at most what the session has beside its other
  open reservations; a task whose reservation is already released is charged nothing, so
  usage is committed exactly once whoever ends the task, however often.

What a client can still spend is committed minus reserved: :data:`SESSION_SELECT` reads a session
row with that in its ``*_remaining`` columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llorch.errors import BudgetExhausted, SessionNotFound
from llorch.persistence.rows import SESSION_COLUMNS, Reservation

_FREE = {
    "tokens_remaining": "tokens_remaining - tokens_reserved",
    "time_ms_remaining": "time_ms_remaining - time_ms_reserved",
    "cost_remaining": "cost_remaining - cost_reserved",
}
# A session row as SessionRow reads it, its budgets what is free: committed minus reserved.
SESSION_SELECT = ", ".join(
    f"GREATEST(0, {_FREE[c]}) AS {c}" if c in _FREE else c for c in SESSION_COLUMNS
)

_LOCK = (
    "SELECT turns, max_turns, tokens_remaining - tokens_reserved, "
    "time_ms_remaining - time_ms_reserved, cost_remaining - cost_reserved "
    "FROM sessions WHERE session_id = %s AND deleted = 0 FOR UPDATE"
)
_HOLD = (
    "UPDATE sessions SET turns = turns + %s, last_used_ms = %s, "
    "tokens_reserved = tokens_reserved + %s, time_ms_reserved = time_ms_reserved + %s, "
    "cost_reserved = ROUND((cost_reserved + %s)::numeric, 9)::float8 WHERE session_id = %s"
)
_TASK_HOLD = (
    "UPDATE tasks SET reserved_tokens = %s, reserved_time_ms = %s, reserved_cost = %s "
    "WHERE task_id = %s"
)
_HELD = (
    "SELECT reserved_tokens, reserved_time_ms, reserved_cost FROM tasks "
    "WHERE task_id = %s AND reserved_tokens IS NOT NULL FOR UPDATE"
)
_RELEASE_TASK = (
    "UPDATE tasks SET reserved_tokens = NULL, reserved_time_ms = NULL, reserved_cost = NULL "
    "WHERE task_id = %s"
)
_CHARGE = (
    "UPDATE sessions SET tokens_remaining = tokens_remaining - %s, "
    "time_ms_remaining = time_ms_remaining - %s, "
    "cost_remaining = GREATEST(0, ROUND((cost_remaining - %s)::numeric, 9)::float8), "
    "tokens_reserved = GREATEST(0, tokens_reserved - %s), "
    "time_ms_reserved = GREATEST(0, time_ms_reserved - %s), "
    "cost_reserved = GREATEST(0, ROUND((cost_reserved - %s)::numeric, 9)::float8) "
    "WHERE session_id = %s"
)
_FREE_BESIDE = (
    "SELECT tokens_remaining - tokens_reserved, time_ms_remaining - time_ms_reserved, "
    "cost_remaining - cost_reserved FROM sessions WHERE session_id = %s AND deleted = 0 "
    "FOR UPDATE"
)

if TYPE_CHECKING:  # imported by the shared queue's module, which a server on SQLite loads
    from psycopg import Connection

    Conn = Connection[tuple[Any, ...]]


def reserve(conn: Conn, session_id: str, want: Reservation, *, now_ms: int, new: bool) -> None:
    """Inside the admission transaction, before the task's row is inserted (the session row's
    lock first): take one turn of the session and hold ``want`` on it; BudgetExhausted (its
    policy label ``turns``, ``tokens``, ``time`` or ``cost``) when the session cannot afford it
    now. ``new``: the session was inserted in this transaction, its turn already counted.
    :func:`hold_on_task` then records the reservation on the task's row."""
    found = conn.execute(_LOCK, (session_id,)).fetchone()
    if found is None:
        raise SessionNotFound(f"session {session_id} not found or expired")
    turns, max_turns, tokens, time_ms, cost = found
    if not new and turns >= max_turns:
        raise BudgetExhausted(
            f"session {session_id} used all {max_turns} turns", policy_label="turns"
        )
    for name, have, need in (
        ("tokens", max(0, tokens), want.tokens),
        ("time", max(0, time_ms), want.time_ms),
        ("cost", max(0.0, round(cost, 9)), want.cost),
    ):
        if need > have:
            raise BudgetExhausted(
                f"session {session_id} has {have} {name} left; the task may need {need}",
                policy_label=name,
            )
    conn.execute(_HOLD, (0 if new else 1, now_ms, want.tokens, want.time_ms, want.cost, session_id))


def hold_on_task(conn: Conn, task_id: str, want: Reservation) -> None:
    """The task's own reservation, on its row: what its end releases (:func:`settle`)."""
    conn.execute(_TASK_HOLD, (want.tokens, want.time_ms, want.cost, task_id))


def settle(conn: Conn, task_id: str, session_id: str, used: Reservation) -> Reservation | None:
    """Inside the transaction of a task's end: release the task's reservation and charge its
    usage; the usage its session could not pay (None when it paid all). Nothing is charged
    when the task holds no reservation any more (its end was committed already)."""
    free_row = conn.execute(_FREE_BESIDE, (session_id,)).fetchone()
    held_row = conn.execute(_HELD, (task_id,)).fetchone()
    if held_row is None:
        return None
    conn.execute(_RELEASE_TASK, (task_id,))
    held = Reservation(int(held_row[0]), int(held_row[1]), float(held_row[2]))
    if free_row is None:  # the session is gone: nothing to charge
        return None
    # What the session has beside its other open reservations (this task's released).
    free = Reservation(
        tokens=max(0, int(free_row[0]) + held.tokens),
        time_ms=max(0, int(free_row[1]) + held.time_ms),
        cost=max(0.0, round(float(free_row[2]) + held.cost, 9)),
    )
    charged = Reservation(
        tokens=min(used.tokens, free.tokens),
        time_ms=min(used.time_ms, free.time_ms),
        cost=min(used.cost, free.cost),
    )
    conn.execute(
        _CHARGE,
        (
            charged.tokens,
            charged.time_ms,
            charged.cost,
            held.tokens,
            held.time_ms,
            held.cost,
            session_id,
        ),
    )
    overrun = Reservation(
        tokens=used.tokens - charged.tokens,
        time_ms=used.time_ms - charged.time_ms,
        cost=round(used.cost - charged.cost, 9),
    )
    return overrun if overrun != Reservation(0, 0, 0.0) else None
