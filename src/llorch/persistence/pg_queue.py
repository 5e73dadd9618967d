"""The pools' queues and the replicas' slots in PostgreSQL, shared by every instance on the
database (ORCH-STATE-0030 .. 0039).

- A queued task has a row in ``queue_entries``; admission counts them, picks a drop-lru victim
  and inserts the task in one transaction under the pool's advisory lock, so a pool's capacity
  holds across instances.
- A claim, under the same lock, counts the replicas' live leases (``slot_leases`` of instances
  whose heartbeat has not expired), takes the queue head (``FOR UPDATE SKIP LOCKED``), and
  moves it from the queue to a lease of the claiming instance. Order: band (interactive before
  batch), then the flow with the least weighted service (``queue_flows.served``), then seq.
- A non-terminal task without an entry belongs to the instance in ``tasks.instance_id``: the one
  running it or ending it. When that instance's heartbeat expires, one survivor (the one that
  locks its ``instances`` row) takes those tasks to end them, drops its leases and its row.

Every call is one transaction; errors are translated by the store that owns the connections
(:class:`llorch.persistence.postgres.PostgresStorage`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from llorch.errors import AdmissionReject, QueueFullDropLru
from llorch.persistence import pg_budgets, rows
from llorch.persistence.rows import (
    ADMIT_COLUMNS,
    SESSION_COLUMNS,
    TASK_COLUMNS,
    Reservation,
    SessionRow,
    TaskRow,
)

if TYPE_CHECKING:  # a server on SQLite never loads the PostgreSQL driver
    import psycopg

    Connection = psycopg.Connection[tuple[Any, ...]]

_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
# An instance's heartbeat, by the database's clock (the store's watcher writes it every
# retry_ms; a claim writes it too, ORCH-STATE-0037).
HEARTBEAT = (
    f"INSERT INTO instances (instance_id, heartbeat_ms) VALUES (%s, {_NOW_MS}) "
    "ON CONFLICT (instance_id) DO UPDATE SET heartbeat_ms = EXCLUDED.heartbeat_ms"
)
_T = ", ".join(f"t.{c}" for c in TASK_COLUMNS)
_OPEN = "t.state IN ('queued', 'running')"
_NO_ENTRY = "NOT EXISTS (SELECT 1 FROM queue_entries q WHERE q.task_id = t.task_id)"
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('llorch-queue:' || %s))"
_INSERT_SESSION = (
    f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) "
    f"VALUES ({', '.join('%s' for _ in SESSION_COLUMNS)})"
)
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(ADMIT_COLUMNS)}, instance_id) "
    f"VALUES ({', '.join('%s' for _ in ADMIT_COLUMNS)}, %s) RETURNING seq"
)
# The drop-lru victim: lower band first, then the flow with the most tasks per unit of weight,
# its oldest task.
_VICTIM = (
    "SELECT task_id FROM (SELECT task_id, band, seq, count(*) OVER (PARTITION BY band, flow) "
    "::float8 / weight AS load FROM queue_entries WHERE pool_id = %s AND band >= %s) v "
    "ORDER BY band DESC, load DESC, seq LIMIT 1"
)
# A flow that becomes active joins at the least service of the band's active flows, so it
# neither starves the others nor is starved (a weighted fair queue's virtual time).
_JOIN_FLOW = (
    "INSERT INTO queue_flows (pool_id, band, flow, served) VALUES (%s, %s, %s, "
    "(SELECT coalesce(min(f.served), 0) FROM queue_flows f WHERE f.pool_id = %s AND f.band = %s "
    "AND EXISTS (SELECT 1 FROM queue_entries q WHERE q.pool_id = f.pool_id AND q.band = f.band "
    "AND q.flow = f.flow))) ON CONFLICT (pool_id, band, flow) "
    "DO UPDATE SET served = GREATEST(queue_flows.served, EXCLUDED.served)"
)
_ORDER = "q.band, coalesce(f.served, 0), q.seq"
_FLOWS_JOIN = (
    "LEFT JOIN queue_flows f ON f.pool_id = q.pool_id AND f.band = q.band AND f.flow = q.flow"
)
_POSITION = (
    f"SELECT count(*) FROM queue_entries q {_FLOWS_JOIN}, "
    f"(SELECT q.band, coalesce(f.served, 0) AS served, q.seq FROM queue_entries q {_FLOWS_JOIN} "
    "WHERE q.task_id = %s) me WHERE q.pool_id = %s "
    "AND (q.band, coalesce(f.served, 0), q.seq) < (me.band, me.served, me.seq)"
)
_LEASED = (
    "SELECT replica_id, count(*) FROM slot_leases l WHERE pool_id = %s AND EXISTS (SELECT 1 "
    f"FROM instances i WHERE i.instance_id = l.instance_id AND i.heartbeat_ms > {_NOW_MS} - %s) "
    "GROUP BY replica_id"
)
_HEAD = (
    f"SELECT q.task_id, q.band, q.flow, q.weight FROM queue_entries q {_FLOWS_JOIN} "
    f"WHERE q.pool_id = %s ORDER BY {_ORDER} LIMIT 1 FOR UPDATE OF q SKIP LOCKED"
)
_BATCH_HEAD = (
    f"SELECT q.task_id, q.band, q.flow, q.weight FROM queue_entries q {_FLOWS_JOIN} "
    f"WHERE q.pool_id = %s AND q.band = 1 ORDER BY {_ORDER} LIMIT 1 FOR UPDATE OF q SKIP LOCKED"
)
_SINCE_BATCH = (
    "INSERT INTO queue_pools (pool_id, since_batch) VALUES (%s, %s) "
    "ON CONFLICT (pool_id) DO UPDATE SET since_batch = EXCLUDED.since_batch"
)
_EXPIRE = (
    "WITH due AS (SELECT task_id FROM queue_entries WHERE pool_id = %s AND (wait_until_ms <= %s "
    "OR deadline_ms <= %s) FOR UPDATE SKIP LOCKED), gone AS (DELETE FROM queue_entries q USING "
    "due WHERE q.task_id = due.task_id RETURNING q.task_id, q.wait_until_ms) "
    f"UPDATE tasks t SET instance_id = %s FROM gone WHERE t.task_id = gone.task_id "
    f"RETURNING {_T}, gone.wait_until_ms"
)
_TAKE = (
    "WITH gone AS (DELETE FROM queue_entries WHERE task_id = %s RETURNING task_id) "
    f"UPDATE tasks t SET instance_id = %s FROM gone WHERE t.task_id = gone.task_id "
    f"RETURNING {_T}"
)
_DEAD = (
    "SELECT instance_id FROM instances WHERE instance_id <> %s "
    f"AND heartbeat_ms <= {_NOW_MS} - %s ORDER BY instance_id LIMIT 1 FOR UPDATE SKIP LOCKED"
)
_ADOPT = (
    f"UPDATE tasks t SET instance_id = %s WHERE t.instance_id = %s AND {_OPEN} AND {_NO_ENTRY} "
    f"RETURNING {_T}"
)
# At start-up: this instance's own open tasks outside the queue (its previous life's), those of
# no instance, and those of instances without a live heartbeat.
_OWN = (
    f"UPDATE tasks t SET instance_id = %s WHERE {_OPEN} AND {_NO_ENTRY} AND (t.instance_id IS "
    "NULL OR t.instance_id = %s OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = "
    f"t.instance_id AND i.heartbeat_ms > {_NOW_MS} - %s)) RETURNING {_T}"
)


@dataclass(frozen=True)
class Entry:
    """A task's place in its pool's queue. ``wait_until_ms`` and ``deadline_ms`` are absolute
    (the admitting instance's clock): past the first it ends QUEUE_TIMEOUT, past the second
    DEADLINE_UNMET."""

    pool_id: str
    band: int
    flow: str
    weight: int = 1
    wait_until_ms: int | None = None
    deadline_ms: int | None = None


@dataclass(frozen=True)
class Expired:
    row: TaskRow
    why: Literal["wait", "deadline"]


# What a claim asks its caller: the replica (of those with a free slot, and how many free) for
# the queue head's row, given its session's last replica (an affinity hint; None when the
# session is gone); None leaves the head queued.
Chooser = Callable[[TaskRow, Mapping[str, int], str | None], str | None]


class PgQueue:
    def __init__(
        self,
        connection: Callable[[], AbstractContextManager[Connection]],
        write: Callable[[], AbstractContextManager[None]],
        instance_id: str,
        instance_ttl_ms: int,
        heartbeat_age_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._connection = connection
        self._write = write
        self.instance_id = instance_id
        self._ttl_ms = instance_ttl_ms
        # Seconds since this instance's heartbeat last reached the database.
        self.heartbeat_age_s = heartbeat_age_s

    def admit(
        self,
        task: TaskRow,
        session: SessionRow,
        *,
        new_session: bool,
        entry: Entry,
        capacity: int,
        policy: str,
        check: Callable[[int], None],
        reservation: Reservation,
    ) -> TaskRow | None:
        """Persist an accepted task and its queue entry in one transaction, under its pool's
        lock, with its session's turn and ``reservation`` taken under the session row's lock
        (pg_budgets.reserve: BudgetExhausted when the session cannot afford it now); the row
        of the drop-lru victim it displaced (taken from the queue for this instance to end), if
        any. ``check(position)`` may refuse it (raising) before commit. A full queue raises
        AdmissionReject or QueueFullDropLru (without retry advice). Locks in order: the pool,
        the session row, the task's row."""
        with self._write(), self._connection() as conn, conn.transaction():
            conn.execute(_LOCK, (entry.pool_id,))
            victim = self._make_room(conn, entry, capacity, policy)
            if new_session:
                conn.execute(_INSERT_SESSION, [getattr(session, c) for c in SESSION_COLUMNS])
            pg_budgets.reserve(
                conn, session.session_id, reservation, now_ms=session.last_used_ms, new=new_session
            )
            values = [*(getattr(task, c) for c in ADMIT_COLUMNS), self.instance_id]
            found = conn.execute(_INSERT_TASK, values).fetchone()
            seq = int(found[0]) if found else 0
            pg_budgets.hold_on_task(conn, task.task_id, reservation)
            self._insert_entry(conn, task.task_id, entry, seq)
            check(_one_int(conn, _POSITION, (task.task_id, entry.pool_id)))
        return victim

    def _make_room(
        self, conn: Connection, entry: Entry, capacity: int, policy: str
    ) -> TaskRow | None:
        queued = _one_int(
            conn, "SELECT count(*) FROM queue_entries WHERE pool_id = %s", (entry.pool_id,)
        )
        if queued < capacity:
            return None
        if policy == "reject":
            raise AdmissionReject("queue is full", policy_label="reject")
        found = conn.execute(_VICTIM, (entry.pool_id, entry.band)).fetchone()
        if found is None:
            raise QueueFullDropLru(
                "queue is full of tasks of higher priority", policy_label="drop-lru"
            )
        taken = conn.execute(_TAKE, (found[0], self.instance_id)).fetchone()
        return rows.task_row(taken) if taken else None

    def _insert_entry(self, conn: Connection, task_id: str, entry: Entry, seq: int) -> None:
        e = entry
        conn.execute(_JOIN_FLOW, (e.pool_id, e.band, e.flow, e.pool_id, e.band))
        conn.execute(
            "INSERT INTO queue_entries (task_id, pool_id, band, flow, weight, seq, wait_until_ms, "
            "deadline_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (task_id, e.pool_id, e.band, e.flow, e.weight, seq, e.wait_until_ms, e.deadline_ms),
        )

    def claim(
        self, pool_id: str, slots: Mapping[str, int], choose: Chooser, batch_every: int = 0
    ) -> tuple[TaskRow, str, str | None] | None:
        """Claim the head of ``pool_id``'s queue for this instance with a lease on the replica
        ``choose`` picks among ``slots`` (replica id → its slots, for the replicas this instance
        may place on) that have a free slot by the live leases; None when there is no head, no
        free slot, or ``choose`` declines; else its row, the leased replica and the affinity
        hint ``choose`` was given. With
        ``batch_every`` (scheduler.queue.batch_every), every so many dispatches go to batch while
        it waits, as on one instance."""
        with self._write(), self._connection() as conn, conn.transaction():
            conn.execute(_LOCK, (pool_id,))
            leased: dict[str, int] = dict(conn.execute(_LEASED, (pool_id, self._ttl_ms)).fetchall())
            free = {r: n - int(leased.get(r, 0)) for r, n in slots.items()}
            free = {r: n for r, n in free.items() if n > 0}
            if not free:
                return None
            head = self._head(conn, pool_id, batch_every)
            if head is None:
                return None
            task_id, band, flow, weight = head
            found = conn.execute(
                f"SELECT {_T} FROM tasks t WHERE t.task_id = %s AND {_OPEN}", (task_id,)
            ).fetchone()
            if found is None:  # an entry without its open task (ended meanwhile): drop it
                conn.execute("DELETE FROM queue_entries WHERE task_id = %s", (task_id,))
                return None
            row = rows.task_row(found)
            hint = conn.execute(
                "SELECT last_replica_id FROM sessions WHERE session_id = %s AND deleted = 0",
                (row.session_id,),
            ).fetchone()
            affinity = None if hint is None or hint[0] is None else str(hint[0])
            replica_id = choose(row, free, affinity)
            if replica_id is None or replica_id not in free:
                return None
            self._lease(conn, row, replica_id, (band, flow, weight))
            if batch_every:
                self._count_batch_share(conn, pool_id, band)
        return row, replica_id, affinity

    def move_lease(self, task_id: str, pool_id: str, replica_id: str, slots: int) -> bool:
        """Move a running task's lease to ``replica_id`` if its live leases leave one of its
        ``slots`` free, under the pool's lock as a claim counts them; whether it moved."""
        with self._write(), self._connection() as conn, conn.transaction():
            conn.execute(_LOCK, (pool_id,))
            leased: dict[str, int] = dict(conn.execute(_LEASED, (pool_id, self._ttl_ms)).fetchall())
            if int(leased.get(replica_id, 0)) >= slots:
                return False
            moved = conn.execute(
                "UPDATE slot_leases SET replica_id = %s WHERE task_id = %s AND instance_id = %s",
                (replica_id, task_id, self.instance_id),
            )
        return moved.rowcount == 1

    def _head(self, conn: Connection, pool_id: str, batch_every: int) -> tuple[Any, ...] | None:
        """The queue head, batch's when its guaranteed share is due."""
        if batch_every:
            since = _one_int(
                conn, "SELECT since_batch FROM queue_pools WHERE pool_id = %s", (pool_id,)
            )
            if since >= batch_every - 1:
                head = conn.execute(_BATCH_HEAD, (pool_id,)).fetchone()
                if head is not None:
                    return head
        return conn.execute(_HEAD, (pool_id,)).fetchone()

    def _count_batch_share(self, conn: Connection, pool_id: str, band: int) -> None:
        if band == 1:
            conn.execute(_SINCE_BATCH, (pool_id, 0))
            return
        waiting = conn.execute(
            "SELECT 1 FROM queue_entries WHERE pool_id = %s AND band = 1 LIMIT 1", (pool_id,)
        ).fetchone()
        if waiting is not None:
            conn.execute(
                "INSERT INTO queue_pools (pool_id, since_batch) VALUES (%s, 1) ON CONFLICT "
                "(pool_id) DO UPDATE SET since_batch = queue_pools.since_batch + 1",
                (pool_id,),
            )

    def _lease(
        self, conn: Connection, row: TaskRow, replica_id: str, flow: tuple[int, str, int]
    ) -> None:
        band, name, weight = flow
        # A lease lives as long as its instance's heartbeat: written with it, the survivors
        # never count it dead before it expires (ORCH-STATE-0037).
        conn.execute(HEARTBEAT, (self.instance_id,))
        conn.execute("DELETE FROM queue_entries WHERE task_id = %s", (row.task_id,))
        conn.execute(
            "UPDATE tasks SET instance_id = %s WHERE task_id = %s", (self.instance_id, row.task_id)
        )
        conn.execute(
            "INSERT INTO slot_leases (task_id, pool_id, replica_id, instance_id) "
            "VALUES (%s, %s, %s, %s)",
            (row.task_id, row.pool_id, replica_id, self.instance_id),
        )
        conn.execute(
            "UPDATE queue_flows SET served = served + 1.0 / %s "
            "WHERE pool_id = %s AND band = %s AND flow = %s",
            (max(1, weight), row.pool_id, band, name),
        )

    def requeue(self, task_id: str, entry: Entry) -> None:
        """A claimed task its engine refused as busy: its lease freed, back in the queue at its
        original seq, its flow's service given back (ORCH-ENG-0015)."""
        with self._write(), self._connection() as conn, conn.transaction():
            conn.execute(_LOCK, (entry.pool_id,))
            conn.execute("DELETE FROM slot_leases WHERE task_id = %s", (task_id,))
            found = conn.execute(
                "SELECT seq FROM tasks WHERE task_id = %s AND state IN ('queued', 'running')",
                (task_id,),
            ).fetchone()
            if found is None:  # it ended meanwhile (a cancel): nothing to send back
                return
            self._insert_entry(conn, task_id, entry, int(found[0]))
            conn.execute(
                "UPDATE queue_flows SET served = served - 1.0 / %s "
                "WHERE pool_id = %s AND band = %s AND flow = %s",
                (max(1, entry.weight), entry.pool_id, entry.band, entry.flow),
            )

    def release(self, task_id: str) -> None:
        """Free a task's lease (idempotent)."""
        with self._write(), self._connection() as conn:
            conn.execute("DELETE FROM slot_leases WHERE task_id = %s", (task_id,))

    def take(self, task_id: str) -> TaskRow | None:
        """Take a queued task out of the queue for this instance to end it (a cancel); None
        when it is not queued (claimed, ended, or unknown)."""
        with self._write(), self._connection() as conn, conn.transaction():
            found = conn.execute(_TAKE, (task_id, self.instance_id)).fetchone()
        return rows.task_row(found) if found else None

    def expire(self, pool_id: str, now_ms: int) -> list[Expired]:
        """Take the queued tasks of ``pool_id`` past their wait limit or deadline, to end them."""
        with self._write(), self._connection() as conn, conn.transaction():
            found = conn.execute(_EXPIRE, (pool_id, now_ms, now_ms, self.instance_id)).fetchall()
        return [
            Expired(
                rows.task_row(r[:-1]),
                "wait" if r[-1] is not None and r[-1] <= now_ms else "deadline",
            )
            for r in found
        ]

    def adopt_dead(self) -> list[TaskRow]:
        """One instance whose heartbeat expired, if any, taken over by this one in one
        transaction (its ``instances`` row locked SKIP LOCKED: one survivor acts): its running
        (or ending) tasks are returned for this instance to end, its leases and its row are
        deleted; its queued tasks stay in the queue."""
        with self._write(), self._connection() as conn, conn.transaction():
            found = conn.execute(_DEAD, (self.instance_id, self._ttl_ms)).fetchone()
            if found is None:
                return []
            dead = str(found[0])
            taken = conn.execute(_ADOPT, (self.instance_id, dead)).fetchall()
            conn.execute("DELETE FROM slot_leases WHERE instance_id = %s", (dead,))
            conn.execute("DELETE FROM instances WHERE instance_id = %s", (dead,))
        return [rows.task_row(r) for r in taken]

    def adopt_own(self) -> list[TaskRow]:
        """At start-up: the open tasks outside the queue that are this instance's to end (its
        own from before, those of no instance or of an expired one); its old leases freed."""
        me = self.instance_id
        with self._write(), self._connection() as conn, conn.transaction():
            taken = conn.execute(_OWN, (me, me, self._ttl_ms)).fetchall()
            conn.execute(
                "DELETE FROM slot_leases l WHERE l.instance_id = %s OR NOT EXISTS (SELECT 1 FROM "
                f"instances i WHERE i.instance_id = l.instance_id AND i.heartbeat_ms > {_NOW_MS}"
                " - %s)",
                (me, self._ttl_ms),
            )
        return [rows.task_row(r) for r in taken]

    def position(self, task_id: str, pool_id: str) -> int | None:
        """0-based position in dispatch order of a queued task (an estimate across flows: the
        service of the flows ahead changes as they are served); None when not queued."""
        with self._connection() as conn:
            found = conn.execute(
                "SELECT 1 FROM queue_entries WHERE task_id = %s", (task_id,)
            ).fetchone()
            if found is None:
                return None
            return _one_int(conn, _POSITION, (task_id, pool_id))

    def depth(self, pool_id: str) -> int:
        with self._connection() as conn:
            return _one_int(
                conn, "SELECT count(*) FROM queue_entries WHERE pool_id = %s", (pool_id,)
            )

    def ended(self, task_ids: Sequence[str]) -> list[TaskRow]:
        """The rows of those of ``task_ids`` that have ended."""
        with self._connection() as conn:
            found = conn.execute(
                f"SELECT {_T} FROM tasks t WHERE t.task_id = ANY(%s) "
                "AND t.state NOT IN ('queued', 'running')",
                (list(task_ids),),
            ).fetchall()
        return [rows.task_row(r) for r in found]


def _one_int(conn: Connection, query: str, params: Sequence[Any]) -> int:
    found = conn.execute(query, params).fetchone()
    return int(found[0]) if found and found[0] is not None else 0
