"""The store of several instances: one PostgreSQL database, through psycopg 3 and its pool.

It implements :class:`llorch.persistence.storage.Storage` with the queries of the SQLite store
(:mod:`llorch.persistence.db`), spelled for PostgreSQL, so that every row reads back as SQLite
gives it. Every ``psycopg.Error`` (the pool's timeouts included) is translated here, once, into
:class:`llorch.errors.StorageError` with the cause kept.

The calls are synchronous, like the interface, and the scheduler makes them through
:meth:`PostgresStorage.run`: in one of ``OFFLOAD_THREADS`` worker threads, so that a round trip
to the server (or a server that stops answering) never blocks the event loop: requests,
streams and ``/livez`` go on meanwhile (ORCH-STATE-0060, docs/configuration.md, "database").
At most ``OFFLOAD_THREADS`` calls are under way at once; more wait for a thread, off the loop.
The pool holds a connection for each thread, one for the link's heartbeat and one spare, so a
call never waits for a connection another call holds. ``server.storage_busy_timeout_ms`` bounds how
long a statement waits for a lock (``lock_timeout``); ``database.timeout_ms`` bounds everything
else a call may wait for (connecting, a statement, a send or a connection the server no longer
answers, a free connection of the pool). While the server is unreachable every call is refused
at once with :class:`llorch.errors.StorageUnavailable`, and the store reconnects by itself
(:mod:`llorch.persistence.pg_link`, ORCH-STATE-0010).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from llorch.config import without_password
from llorch.errors import StorageError, StorageUnavailable
from llorch.persistence import pg_budgets, pg_schema, rows
from llorch.persistence.cluster import Cluster
from llorch.persistence.pg_control import PgCluster
from llorch.persistence.pg_link import Link, Pool
from llorch.persistence.pg_queue import HEARTBEAT, PgQueue
from llorch.persistence.rows import (
    ADMIT_COLUMNS,
    SESSION_COLUMNS,
    TASK_COLUMNS,
    ArtifactInsert,
    EndedElsewhere,
    Reservation,
    SessionRow,
    TaskRow,
)

T = TypeVar("T")
P = ParamSpec("P")

# How many storage calls may be under way at once, each in a worker thread of its own: enough
# for an admission, a read, a task's end and a dispatcher's claim to overlap on a small
# machine; a burst beyond it queues for a thread, off the event loop.
OFFLOAD_THREADS = 4
# A connection for each worker thread, one for the link's watcher (the heartbeat) and one
# spare while the pool replaces a broken one: a call never waits for another's connection.
POOL_MAX_SIZE = OFFLOAD_THREADS + 2

_TASKS = ", ".join(TASK_COLUMNS)
_INSERT_SESSION = (
    f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) "
    f"VALUES ({', '.join('%s' for _ in SESSION_COLUMNS)})"
)
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(ADMIT_COLUMNS)}, instance_id) "
    f"VALUES ({', '.join('%s' for _ in ADMIT_COLUMNS)}, %s) RETURNING seq"
)
# The database's clock, in milliseconds: instances' heartbeats and their expiry agree on it.
_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
# The tasks in some states that are this instance's to reconcile, claimed for it: its own, those
# of no instance, and those of instances whose heartbeat expired; never a live instance's.
_CLAIM = (
    f"WITH claimed AS (UPDATE tasks SET instance_id = %s WHERE state = ANY(%s) "
    "AND (instance_id IS NULL OR instance_id = %s OR NOT EXISTS (SELECT 1 FROM instances i "
    f"WHERE i.instance_id = tasks.instance_id AND i.heartbeat_ms > {_NOW_MS} - %s)) "
    f"RETURNING {_TASKS}) SELECT {_TASKS} FROM claimed ORDER BY seq"
)
_PLACE_SESSION = "UPDATE sessions SET last_pool_id = %s, last_replica_id = %s WHERE session_id = %s"


_OWN_VIEWS = rows.own_views("%s")
_SHOWN = {viewer: rows.shown(viewer, "%s", "%s::text") for viewer in (False, True)}


class PostgresStorage:
    # Session reservations live in the database (persistence.pg_budgets), not in a process.
    holds_reservations = True
    # Calls made through run() go to a worker thread: the event loop never waits on the network.
    offloads = True

    def __init__(
        self,
        link: Link,
        retry_ms: int = 1000,
        instance: tuple[str, int] = ("llorch", 10_000),
        call_timeout_s: float | None = None,
    ) -> None:
        self._link = link
        self._retry_ms = retry_ms
        # How long run() waits for a call before it answers StorageUnavailable (None: for
        # ever): database.timeout_ms plus the lock wait server.storage_busy_timeout_ms allows.
        self._call_timeout_s = call_timeout_s
        self._instance_id, self._instance_ttl_ms = instance
        # Set by the worker threads' writes, read on the loop (readiness): one flag, no more.
        self._write_failing = False
        self._threads = ThreadPoolExecutor(OFFLOAD_THREADS, thread_name_prefix="llorch-pg")
        # PostgreSQL waits for a lock inside the statement (its lock_timeout): when_free has
        # nothing to retry, as this store never raises StorageBusy.
        self.busy_budget_s = 0.0
        # What the instances on this database share beyond the rows (pool control, bodies).
        self.cluster: Cluster | None = PgCluster(
            self._connection, self._write, self._instance_ttl_ms
        )

    @classmethod
    def open(
        cls,
        url: str,
        *,
        profile: str,
        busy_timeout_ms: int = 5000,
        timeout_ms: int = 5000,
        retry_ms: int = 1000,
        instance: tuple[str, int] = ("llorch", 10_000),
    ) -> PostgresStorage:
        """Connect, migrate, check the profile and verify the schema, then open the pool.
        ``instance``: this instance's id and how long a heartbeat lasts (milliseconds)."""
        shown = without_password(url)
        instance_id = instance[0]

        def heartbeat(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            conn.execute(HEARTBEAT, (instance_id,))

        try:
            conninfo = _conninfo(url, timeout_ms)
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
                pg_schema.migrate(conn)
                pg_schema.claim_profile(conn, profile)
                pg_schema.verify_schema(conn)
                heartbeat(conn)  # before the reconcile: a live instance from the start
            link = Link(
                functools.partial(_open_pool, conninfo, busy_timeout_ms, timeout_ms),
                retry_s=retry_ms / 1000,
                timeout_s=timeout_ms / 1000,
                shown=shown,
                check=heartbeat,
            )
        except psycopg.Error as exc:
            raise StorageError(f"cannot open database {shown}: {exc}") from exc
        return cls(link, retry_ms, instance, (timeout_ms + busy_timeout_ms) / 1000)

    # A commit returns once PostgreSQL has flushed it (synchronous_commit = on): nothing to
    # wait for after it.
    async def durable(self) -> None:
        return None

    def when_durable(self, callback: Callable[[], None]) -> None:
        callback()

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)`` in a worker thread (the caller's context variables with
        it, for the log lines), the event loop free until it returns. A call the server does
        not answer within ``database.timeout_ms`` (plus the lock wait allowed) is answered
        StorageUnavailable (ORCH-STATE-0010): a frozen server, or a middlebox that keeps its
        connections open, acknowledges what it is sent, so no socket timeout fires. The call
        itself goes on in its thread until its connection answers or breaks; a write among
        them may still commit (as when a commit's answer is lost)."""
        bound = functools.partial(contextvars.copy_context().run, call, *args, **kwargs)
        pending = asyncio.get_running_loop().run_in_executor(self._threads, bound)
        if self._call_timeout_s is None:
            return await pending
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result of a call
        # that ends as its caller is cancelled, and so swallows the cancel (a dispatcher loop
        # then never stopped, and a shutdown hung).
        try:
            async with asyncio.timeout(self._call_timeout_s):
                return await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(_forget)  # its outcome is no one's now
            raise
        except TimeoutError:
            pending.add_done_callback(_forget)
            self.write_failing = True
            raise StorageUnavailable(
                f"the database did not answer within {round(self._call_timeout_s * 1000)} ms",
                retry_after_ms=self._retry_ms,
            ) from None

    def close(self) -> None:
        # Calls not begun are dropped; those under way end with the pool (a StorageError).
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._link.close()

    @functools.cached_property
    def queue(self) -> PgQueue:
        """The pools' shared queues and the replicas' slot leases (ORCH-STATE-0030)."""
        return PgQueue(
            self._connection,
            self._write,
            self._instance_id,
            self._instance_ttl_ms,
            heartbeat_age_s=self._link.heartbeat_age_s,
        )

    @property
    def write_failing(self) -> bool:
        """As for SQLite: whether the most recent write was refused; and while the server is
        lost, whatever the last write did."""
        return self._write_failing or not self._link.up

    @write_failing.setter
    def write_failing(self, value: bool) -> None:
        self._write_failing = value

    def schema_version(self) -> int:
        with self._connection() as conn:
            return pg_schema.schema_version(conn)

    # -- sessions ---------------------------------------------------------------------------

    def insert_session(self, row: SessionRow) -> None:
        with self._write(), self._connection() as conn:
            conn.execute(_INSERT_SESSION, [getattr(row, c) for c in SESSION_COLUMNS])

    def get_session(self, session_id: str) -> SessionRow | None:
        """The session, its budgets what is free (committed minus reserved, ORCH-STATE-0051)."""
        with self._connection() as conn:
            found = conn.execute(
                f"SELECT {pg_budgets.SESSION_SELECT} FROM sessions "
                "WHERE session_id = %s AND deleted = 0",
                (session_id,),
            ).fetchone()
        return SessionRow(*found) if found else None

    def delete_session(self, session_id: str) -> bool:
        with self._write(), self._connection() as conn:
            cur = conn.execute(
                "UPDATE sessions SET deleted = 1 WHERE session_id = %s AND deleted = 0",
                (session_id,),
            )
        return cur.rowcount > 0

    # -- tasks ------------------------------------------------------------------------------

    def admit_task(
        self,
        task: TaskRow,
        session: SessionRow,
        *,
        new_session: bool,
        reservation: Reservation | None = None,
    ) -> int:
        """Persist an accepted task and its session's use in one transaction; returns its seq.
        With ``reservation``: the turn and the reservation are taken under the session row's
        lock, BudgetExhausted when it cannot afford them (pg_budgets.reserve)."""
        values = [*(getattr(task, c) for c in ADMIT_COLUMNS), self._instance_id]
        with self._write(), self._connection() as conn, conn.transaction():
            if new_session:
                conn.execute(_INSERT_SESSION, [getattr(session, c) for c in SESSION_COLUMNS])
            elif reservation is None:
                conn.execute(
                    "UPDATE sessions SET last_used_ms = %s, turns = %s WHERE session_id = %s",
                    (session.last_used_ms, session.turns, session.session_id),
                )
            if reservation is not None:  # the session row's lock before the task's row
                pg_budgets.reserve(
                    conn,
                    session.session_id,
                    reservation,
                    now_ms=session.last_used_ms,
                    new=new_session,
                )
            found = conn.execute(_INSERT_TASK, values).fetchone()
            if reservation is not None:
                pg_budgets.hold_on_task(conn, task.task_id, reservation)
        return int(found[0]) if found else 0

    def get_task(self, task_id: str) -> TaskRow | None:
        with self._connection() as conn:
            found = conn.execute(
                f"SELECT {_TASKS} FROM tasks WHERE task_id = %s", (task_id,)
            ).fetchone()
        return rows.task_row(found) if found else None

    def update_task(self, task_id: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = %s" for k in values)
        with self._write(), self._connection() as conn:
            conn.execute(f"UPDATE tasks SET {sets} WHERE task_id = %s", (*values.values(), task_id))

    def place_task(
        self, task_id: str, session_id: str, *, pool_id: str, replica_id: str, **task_values: Any
    ) -> None:
        """The task's replica (and its other changed columns) and its session's placement, in
        one transaction; nothing once the task has ended (its end may commit first: a cancel
        while its start is written, in another thread, ORCH-STATE-0060)."""
        sets = ", ".join(f"{k} = %s" for k in ("replica_id", *task_values))
        with self._write(), self._connection() as conn, conn.transaction():
            placed = conn.execute(
                f"UPDATE tasks SET {sets} WHERE task_id = %s AND state IN ('queued', 'running')",
                (replica_id, *task_values.values(), task_id),
            )
            if placed.rowcount == 0:
                return
            conn.execute(_PLACE_SESSION, (pool_id, replica_id, session_id))
            # A task moved to another replica takes its slot lease along (ORCH-STATE-0033).
            conn.execute(
                "UPDATE slot_leases SET replica_id = %s WHERE task_id = %s", (replica_id, task_id)
            )

    def finish_task(
        self,
        task_id: str,
        task_values: dict[str, Any],
        session_id: str,
        session_values: dict[str, Any],
        trace: ArtifactInsert | None = None,
        used: Reservation | None = None,
    ) -> Reservation | None:
        """The task's terminal state, its session's usage and its trace's row, together. With
        ``used``: the task's own reservation released and ``used`` charged under the session
        row's lock (pg_budgets.settle); returns the usage its session could not pay. Nothing
        but the lease's release when the task has ended already (another instance took it over
        and ended it, or a commit whose answer was lost is tried again; its reservation went
        with that end, so settle charges nothing): a task ends and is charged once
        (ORCH-STATE-0036); then, once committed, EndedElsewhere with the stored row
        (ORCH-STATE-0038)."""
        task_sets = ", ".join(f"{k} = %s" for k in task_values)
        session_sets = ", ".join(f"{k} = %s" for k in session_values)
        overrun = None
        stored = None
        with self._write(), self._connection() as conn, conn.transaction():
            if used is not None:  # first: the session row's lock before the task row's
                overrun = pg_budgets.settle(conn, task_id, session_id, used)
            # Its slot lease, if it held one, ends with it (ORCH-STATE-0033).
            conn.execute("DELETE FROM slot_leases WHERE task_id = %s", (task_id,))
            ended = conn.execute(
                f"UPDATE tasks SET {task_sets} WHERE task_id = %s "
                "AND state IN ('queued', 'running')",
                (*task_values.values(), task_id),
            )
            if ended.rowcount == 0:
                stored = conn.execute(
                    f"SELECT {_TASKS} FROM tasks WHERE task_id = %s", (task_id,)
                ).fetchone()
            else:
                if trace is not None:
                    _insert_artifact(conn, trace)
                if session_values:
                    conn.execute(
                        f"UPDATE sessions SET {session_sets} WHERE session_id = %s",
                        (*session_values.values(), session_id),
                    )
        if stored is not None:
            raise EndedElsewhere(rows.task_row(stored))
        return overrun

    def record_progress(self, progress: Sequence[tuple[str, int]], now_ms: int) -> None:
        """Checkpoint the tokens running tasks have produced so far, in one transaction."""
        with self._write(), self._connection() as conn, conn.transaction():
            conn.cursor().executemany(
                "UPDATE tasks SET tokens_out = %s, progress_ms = %s WHERE task_id = %s "
                "AND state IN ('queued', 'running')",
                [(tokens_out, now_ms, task_id) for task_id, tokens_out in progress],
            )

    def list_tasks(
        self,
        *,
        session_id: str | None,
        state: str | None,
        limit: int,
        before_seq: int | None,
        owner: str | None = None,
    ) -> list[TaskRow]:
        """Newest first; ``owner`` given: only that owner's tasks."""
        query, params = rows.task_list("%s", session_id, state, before_seq, owner, limit)
        with self._connection() as conn:
            found = conn.execute(query, params).fetchall()
        return [rows.task_row(r) for r in found]

    def tasks_in_states(self, states: Sequence[str]) -> list[TaskRow]:
        """The tasks in ``states`` this instance reconciles, claimed for it in one statement:
        its own, and those of instances whose heartbeat expired; never a live instance's
        (two instances starting at once never both claim one)."""
        me, ttl_ms = self._instance_id, self._instance_ttl_ms
        with self._write(), self._connection() as conn:
            found = conn.execute(_CLAIM, (me, list(states), me, ttl_ms)).fetchall()
        return [rows.task_row(r) for r in found]

    def probe_write(self) -> bool:
        """While writes fail, one write that changes nothing (a row lock on sessions taken and
        a commit made); whether storage takes writes again."""
        try:
            with self._write(), self._connection() as conn, conn.transaction():
                conn.execute("DELETE FROM sessions WHERE false")
        except StorageError:
            return False
        return True

    # -- artifacts --------------------------------------------------------------------------

    def insert_artifact(self, artifact: ArtifactInsert) -> bool:
        """True when this is its owner's first store of the content (as for SQLite)."""
        with self._write(), self._connection() as conn, conn.transaction():
            return _insert_artifact(conn, artifact)

    def artifact_owned_by(self, artifact_id: str, owner: str) -> bool:
        with self._connection() as conn:
            found = conn.execute(
                "SELECT 1 FROM artifact_views WHERE artifact_id = %s AND owner = %s",
                (artifact_id, owner),
            ).fetchone()
        return found is not None

    def get_artifact(self, artifact_id: str, viewer: str | None = None) -> dict[str, Any] | None:
        """The artifact as ``viewer`` stored it when it has a view of its own, else as its
        first store did (None: the content is not stored)."""
        with self._connection() as conn:
            cur = conn.execute(
                f"SELECT * FROM ({_SHOWN[viewer is not None]}) AS shown WHERE artifact_id = %s",
                (viewer, artifact_id),
            )
            found = cur.fetchone()
            columns = [d.name for d in cur.description or ()]
        return dict(zip(columns, found, strict=True)) if found else None

    def list_artifacts(
        self,
        *,
        kind: str | None,
        tag: str | None,
        task_id: str | None,
        limit: int,
        before_seq: int | None,
        owner: str | None = None,
        viewer: str | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first, with the filters and views of the SQLite store's list_artifacts."""
        where, params = rows.where(
            ("kind = %s", kind),
            (
                "EXISTS (SELECT 1 FROM json_array_elements_text(shown.tags::json) AS t(value) "
                "WHERE t.value = %s)",
                tag,
            ),
            ("task_id = %s", task_id),
            ("seq < %s", before_seq),
        )
        source = _OWN_VIEWS if owner is not None else _SHOWN[viewer is not None]
        with self._connection() as conn:
            cur = conn.execute(
                f"SELECT * FROM ({source}) AS shown {where} ORDER BY seq DESC LIMIT %s",
                (owner if owner is not None else viewer, *params, limit),
            )
            found = cur.fetchall()
            columns = [d.name for d in cur.description or ()]
        return [dict(zip(columns, row, strict=True)) for row in found]

    # -- helpers ----------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A connection of the pool (autocommit: each statement its own transaction unless in
        ``conn.transaction()``); any psycopg error becomes a StorageError: StorageUnavailable
        when a retry can cure it (the server lost, a statement or lock past its budget)."""
        pool = self._link.pool()
        try:
            with pool.connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    raise self._translate(exc, lost=conn.broken or conn.closed) from exc
        except psycopg.Error as exc:  # no connection within the budget, or the pool closed
            raise self._translate(exc, lost=True) from exc

    def _translate(self, exc: psycopg.Error, *, lost: bool) -> StorageError:
        if lost:
            self._link.lose(exc)
            return StorageUnavailable("the database is unreachable", retry_after_ms=self._retry_ms)
        if isinstance(exc, psycopg.OperationalError):
            # statement_timeout, lock_timeout, a serialization failure or deadlock: the
            # statement was refused, the server is there.
            return StorageUnavailable(
                "the database did not take the call in time", retry_after_ms=self._retry_ms
            )
        return StorageError(f"storage failure: {exc}")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Records whether the write inside succeeded."""
        try:
            yield
        except StorageError:
            self.write_failing = True
            raise
        self.write_failing = False


def _forget(done: asyncio.Future[Any]) -> None:
    """The end of a call its caller stopped waiting for: its outcome, read and dropped."""
    if not done.cancelled():
        done.exception()


def _conninfo(url: str, timeout_ms: int) -> str:
    """The URL with the bounds of ``database.timeout_ms`` where it does not set its own: no
    connect, unacknowledged send or silent connection outlasts it."""
    params = conninfo_to_dict(url)
    timeout_s = max(1, math.ceil(timeout_ms / 1000))
    params.setdefault("connect_timeout", max(2, timeout_s))  # libpq's minimum is 2
    params.setdefault("tcp_user_timeout", timeout_ms)
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", max(1, timeout_s // 2))
    params.setdefault("keepalives_interval", 1)
    params.setdefault("keepalives_count", 3)
    return make_conninfo("", **params)


def _open_pool(conninfo: str, busy_timeout_ms: int, timeout_ms: int) -> Pool:
    """A pool of connections that bound locks and statements, opened with one connection."""

    def configure(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        conn.execute(f"SET lock_timeout = {int(busy_timeout_ms)}")
        conn.execute(f"SET statement_timeout = {int(timeout_ms)}")

    pool: Pool = ConnectionPool(
        conninfo,
        min_size=1,
        max_size=POOL_MAX_SIZE,
        kwargs={"autocommit": True},
        configure=configure,
        timeout=timeout_ms / 1000,
        name="llorch",
        open=False,
    )
    try:
        pool.open(wait=True, timeout=timeout_ms / 1000)
    except BaseException:
        pool.close(timeout=0)
        raise
    return pool


def _insert_artifact(conn: psycopg.Connection[tuple[Any, ...]], a: ArtifactInsert) -> bool:
    values = (a.artifact_id, a.digest, a.kind, a.size_bytes, a.created_ms, a.tags, a.parent)
    cur = conn.execute(
        "INSERT INTO artifacts (artifact_id, digest, kind, size_bytes, created_ms, tags, "
        "parent, task_id, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (artifact_id) DO NOTHING",
        (*values, a.task_id, a.metadata),
    )
    if a.owner is None:
        return cur.rowcount > 0
    view = conn.execute(
        "INSERT INTO artifact_views (artifact_id, owner, kind, created_ms, tags, parent, "
        "task_id, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (artifact_id, owner) DO NOTHING",
        (a.artifact_id, a.owner, a.kind, a.created_ms, a.tags, a.parent, a.task_id, a.metadata),
    )
    return view.rowcount > 0
