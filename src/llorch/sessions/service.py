"""Sessions and budgets.

The database holds each session's *committed* remaining budgets. Tasks that are admitted but not
finished hold a :class:`Reservation`: the worst case they may spend (prompt estimate plus
``max_tokens``, the estimated engine time, the worst-case cost). What a client can still spend
is the committed remainder minus the open reservations; when a task ends, its reservation is
released and its actual usage is committed, in the same transaction as the task's final state.

With SQLite (one process) the reservations are held here, in memory. With a store that holds
them (PostgreSQL, several instances: ``Storage.holds_reservations``) they live in the database,
taken in the admission transaction and released in the task's end (persistence.pg_budgets), and
a session row read from it already carries committed minus reserved: the book kept here then only
says which sessions' rows :meth:`SessionService.remaining_for` may cache.

The ``fetch_*`` methods read through :meth:`Storage.run` (a worker thread on PostgreSQL), for
callers on the event loop that may wait; the others call storage inline.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, replace

from llorch.clock import Clock
from llorch.config import Budget, Settings
from llorch.errors import BudgetExhausted, SessionNotFound, StorageError
from llorch.persistence import Reservation, SessionRow, Storage

__all__ = ["Remaining", "Reservation", "Session", "SessionService", "Settled", "new_id"]

log = logging.getLogger("llorch.sessions")


@dataclass(frozen=True)
class Remaining:
    tokens: int
    time_ms: int
    cost: float


@dataclass(frozen=True)
class Settled:
    """A task's usage, charged: the session's new column values, and the usage its session
    could not pay (None when it paid all)."""

    values: dict[str, int | float]
    overrun: Reservation | None
    # For a store that holds reservations: the usage it charges itself (Storage.finish_task).
    used: Reservation | None = None


@dataclass(frozen=True)
class Session:
    row: SessionRow
    remaining: Remaining
    ttl_ms_remaining: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class SessionService:
    def __init__(self, db: Storage, settings: Settings, clock: Clock) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self._reserved: dict[str, dict[str, Reservation]] = {}
        self._in_storage = db.holds_reservations
        # The stored rows of sessions with open reservations, for remaining_for (a metrics
        # event every few tokens of every running task): their committed budgets change only
        # through committed_values and delete, which drop the row, and a row leaves with the
        # session's last reservation.
        self._rows: dict[str, SessionRow | None] = {}
        # On a store that offloads: the reads that fill _rows for the next metrics frame.
        self._reads: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def new_row(
        self,
        *,
        ttl_ms: int | None = None,
        max_turns: int | None = None,
        budget: Budget | None = None,
        owner: str | None = None,
        cap: Budget | None = None,
    ) -> SessionRow:
        """A new session's row; requested values are capped by the server's policy and by
        ``cap`` (the budgets of the API key that creates it)."""
        policy = self._settings.budgets
        want = budget or policy.default
        limit = policy.max if cap is None else _least(policy.max, cap)
        now = self._clock.now_ms()
        return SessionRow(
            session_id=new_id("s"),
            created_ms=now,
            last_used_ms=now,
            ttl_ms=min(
                ttl_ms or self._settings.sessions.ttl_ms, self._settings.sessions.max_ttl_ms
            ),
            turns=0,
            max_turns=min(
                max_turns or self._settings.sessions.max_turns, self._settings.sessions.max_turns
            ),
            tokens_remaining=min(want.tokens, limit.tokens),
            time_ms_remaining=min(want.time_ms, limit.time_ms),
            cost_remaining=min(want.cost, limit.cost),
            owner=owner,
        )

    def create(
        self,
        *,
        ttl_ms: int | None = None,
        max_turns: int | None = None,
        tokens: int | None = None,
        time_ms: int | None = None,
        cost: float | None = None,
        owner: str | None = None,
        cap: Budget | None = None,
    ) -> Session:
        default = self._settings.budgets.default
        budget = Budget(
            tokens=default.tokens if tokens is None else tokens,
            time_ms=default.time_ms if time_ms is None else time_ms,
            cost=default.cost if cost is None else cost,
        )
        row = self.new_row(ttl_ms=ttl_ms, max_turns=max_turns, budget=budget, owner=owner, cap=cap)
        self._db.insert_session(row)
        return self._view(row)

    def get(self, session_id: str, *, visible_to: str | None = None) -> Session:
        return self._view(self.live_row(session_id, visible_to=visible_to))

    async def fetch(self, session_id: str, *, visible_to: str | None = None) -> Session:
        """:meth:`get`, its read through Storage.run."""
        return self._view(await self.fetch_live_row(session_id, visible_to))

    def delete(self, session_id: str, *, visible_to: str | None = None) -> None:
        self.delete_stored(session_id, visible_to=visible_to)
        self.forget(session_id)

    def delete_stored(self, session_id: str, *, visible_to: str | None = None) -> None:
        """The storage half of :meth:`delete` (it touches nothing else: Storage.run may call
        it in a worker thread); :meth:`forget` is the rest."""
        self.live_row(session_id, visible_to=visible_to)
        self._db.delete_session(session_id)

    def forget(self, session_id: str) -> None:
        """What this process holds of a deleted session."""
        self._reserved.pop(session_id, None)
        self._rows.pop(session_id, None)

    def live_row(self, session_id: str, *, visible_to: str | None = None) -> SessionRow:
        """The session's row, or SessionNotFound when it is unknown, deleted or expired, or
        (``visible_to`` given) owned by someone else."""
        return self._live(session_id, self._db.get_session(session_id), visible_to)

    async def fetch_live_row(self, session_id: str, visible_to: str | None) -> SessionRow:
        """:meth:`live_row`, its read through Storage.run."""
        row = await self._db.run(self._db.get_session, session_id)
        return self._live(session_id, row, visible_to)

    def _live(self, session_id: str, row: SessionRow | None, visible_to: str | None) -> SessionRow:
        if (
            row is None
            or self._expired(row)
            or (visible_to is not None and row.owner != visible_to)
        ):
            raise SessionNotFound(f"session {session_id} not found or expired")
        return row

    def live_row_or_none(self, session_id: str) -> SessionRow | None:
        try:
            return self.live_row(session_id)
        except SessionNotFound:
            return None

    def _expired(self, row: SessionRow) -> bool:
        return self._clock.now_ms() - row.last_used_ms >= row.ttl_ms

    # -- budgets ----------------------------------------------------------------------------

    def remaining(self, row: SessionRow) -> Remaining:
        open_ = () if self._in_storage else self._reserved.get(row.session_id, {}).values()
        return Remaining(
            tokens=max(0, row.tokens_remaining - sum(r.tokens for r in open_)),
            time_ms=max(0, row.time_ms_remaining - sum(r.time_ms for r in open_)),
            cost=max(0.0, round(row.cost_remaining - sum(r.cost for r in open_), 9)),
        )

    def remaining_for(self, session_id: str) -> Remaining:
        """What the session can still spend; zero for a session that no longer exists. With a
        store that holds reservations, read from it (other instances change it too)."""
        if self._in_storage:
            row = self._db.get_session(session_id)
            return Remaining(0, 0, 0.0) if row is None else self.remaining(row)
        return self.remaining_in_stream(session_id)

    async def fetch_remaining(self, session_id: str) -> Remaining:
        """:meth:`remaining_for`, a read from a store that holds reservations through
        Storage.run."""
        if self._in_storage:
            row = await self._db.run(self._db.get_session, session_id)
            return Remaining(0, 0, 0.0) if row is None else self.remaining(row)
        return self.remaining_in_stream(session_id)

    def remaining_in_stream(self, session_id: str) -> Remaining:
        """:meth:`remaining_for`, for a stream's metrics frames (every few tokens of every
        running task): the row is cached while this process holds reservations of the session,
        so with a store that holds reservations it lags what other instances did since."""
        if session_id in self._rows:
            row = self._rows[session_id]
        else:
            row = self._db.get_session(session_id)
            if session_id in self._reserved:
                self._rows[session_id] = row
        return Remaining(0, 0, 0.0) if row is None else self.remaining(row)

    def stream_remaining(self, session_id: str) -> Remaining | None:
        """:meth:`remaining_in_stream` for a frame that can do without: on a store that
        offloads, None while the row is not cached (it is read in a worker thread for a later
        frame), never a read on the loop."""
        if not self._db.offloads or session_id in self._rows:
            return self.remaining_in_stream(session_id)
        if session_id not in self._reads:
            read = asyncio.get_running_loop().create_task(self._read_row(session_id))
            self._reads[session_id] = read
            read.add_done_callback(lambda _: self._reads.pop(session_id, None))
        return None

    async def _read_row(self, session_id: str) -> None:
        try:
            row = await self._db.run(self._db.get_session, session_id)
        except StorageError as exc:
            log.debug("session %s: its budgets could not be read: %s", session_id, exc)
            return
        if session_id in self._reserved:
            self._rows[session_id] = row

    def check_use(self, row: SessionRow, want: Reservation) -> SessionRow:
        """The row after one more turn, or BudgetExhausted when the task cannot fit."""
        if row.turns >= row.max_turns:
            raise BudgetExhausted(
                f"session {row.session_id} used all {row.max_turns} turns", policy_label="turns"
            )
        left = self.remaining(row)
        for name, have, need in (
            ("tokens", left.tokens, want.tokens),
            ("time", left.time_ms, want.time_ms),
            ("cost", left.cost, want.cost),
        ):
            if need > have:
                raise BudgetExhausted(
                    f"session {row.session_id} has {have} {name} left; the task may need {need}",
                    policy_label=name,
                )
        return replace(row, turns=row.turns + 1, last_used_ms=self._clock.now_ms())

    def admitted(self, row: SessionRow) -> Remaining:
        """What the session can spend once the task just admitted holds its reservation."""
        return self.remaining_for(row.session_id) if self._in_storage else self.remaining(row)

    def reserve(
        self, session_id: str, task_id: str, amount: Reservation, row: SessionRow | None = None
    ) -> None:
        """Hold ``amount`` for the task; ``row``: its session's row as the admission just
        stored it, kept for :meth:`settle` and the stream's budgets (no read of it per task)."""
        self._reserved.setdefault(session_id, {})[task_id] = amount
        if self._in_storage:
            self._rows.pop(session_id, None)  # the stored row changed with this reservation
        elif row is not None:
            self._rows[session_id] = row

    def release(self, session_id: str, task_id: str) -> None:
        held = self._reserved.get(session_id)
        if held is not None:
            held.pop(task_id, None)
            if not held:
                del self._reserved[session_id]
                self._rows.pop(session_id, None)

    def settle(self, session_id: str, task_id: str, used: Reservation) -> Settled:
        """Release a task's reservation and charge its usage: the session's column values to
        store (with the task's final row), and what it could not pay.

        A task is charged at most what its session has left beside the other open
        reservations (its own included), so neither the session nor the tasks still running
        on their reservations are ever overspent; the rest is the task's overrun. With a store
        that holds reservations, the store does that itself, under the session row's lock:
        the result carries ``used`` for :meth:`Storage.finish_task`.
        """
        # The row kept while the session has open reservations holds its committed budgets.
        kept, kept_row = session_id in self._rows, self._rows.get(session_id)
        self.release(session_id, task_id)
        self._rows.pop(session_id, None)  # the caller stores the new values
        if self._in_storage:
            return Settled({}, None, used=used)
        row = kept_row if kept else self._db.get_session(session_id)
        if row is None:
            return Settled({}, None)
        free = self.remaining(row)
        charged = Reservation(
            tokens=min(used.tokens, free.tokens),
            time_ms=min(used.time_ms, free.time_ms),
            cost=min(used.cost, free.cost),
        )
        values: dict[str, int | float] = {
            "tokens_remaining": row.tokens_remaining - charged.tokens,
            "time_ms_remaining": row.time_ms_remaining - charged.time_ms,
            "cost_remaining": max(0.0, round(row.cost_remaining - charged.cost, 9)),
        }
        overrun = Reservation(
            tokens=used.tokens - charged.tokens,
            time_ms=used.time_ms - charged.time_ms,
            cost=round(used.cost - charged.cost, 9),
        )
        return Settled(values, overrun if overrun != Reservation(0, 0, 0.0) else None)

    def _view(self, row: SessionRow) -> Session:
        ttl_left = max(0, row.ttl_ms - (self._clock.now_ms() - row.last_used_ms))
        return Session(row=row, remaining=self.remaining(row), ttl_ms_remaining=ttl_left)


def _least(a: Budget, b: Budget) -> Budget:
    return Budget(
        tokens=min(a.tokens, b.tokens), time_ms=min(a.time_ms, b.time_ms), cost=min(a.cost, b.cost)
    )
