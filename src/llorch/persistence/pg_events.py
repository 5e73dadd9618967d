"""The durable transcript of running tasks on PostgreSQL, and the cancel asked across instances.

:class:`Transcript` appends the frames of the tasks this instance runs to ``task_events`` off
the event loop: :meth:`Transcript.append` only puts the frame in a queue (a deque append, a
microsecond); a writer thread with a connection of its own takes up to ``max_batch`` frames at
a time, at most ``flush_s`` after the first one came (at once for a terminal frame), and writes
them in one statement, its own transaction: one row per task holding that task's frames of the
flush (``task_id, first_seq, last_seq, frames``, ORCH-STATE-0062) and one ``NOTIFY`` on
:data:`EVENTS_CHANNEL` whose payload is the space-separated ids of the tasks it wrote frames
for. Frame ids are the streams' own ids, so they are the same on every instance; a read
returns each frame once, in id order, whatever rows hold it.

While the database is unreachable the frames wait in the queue (at most ``_MAX_PENDING``; past
that new frames are dropped and counted, and readers see a gap before the terminal frame) and
the thread tries again every ``retry_s``. Rows of tasks that ended more than
:data:`RETENTION_MS` (2 minutes) ago are deleted by every instance's writer, every 10 s:
nothing grows without bound.

The reads (:meth:`Transcript.read`, :meth:`Transcript.request_cancel`, …) block on the network:
they are meant for a thread (``asyncio.to_thread``), except the cancel, a single statement as
every other call of :class:`llorch.persistence.postgres.PostgresStorage`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from llorch.errors import StorageError, StorageUnavailable
from llorch.persistence.pg_notify import MAX_PAYLOAD_BYTES, Listener
from llorch.persistence.postgres import _conninfo

log = logging.getLogger("llorch.persistence")

EVENTS_CHANNEL = "llorch_events"
CANCEL_CHANNEL = "llorch_cancel"
# How long the rows of an ended task are kept (its trace keeps the transcript after that): long
# enough for a client to reconnect, short enough that the table stays small (3,200 frames/s of
# load keep ~400,000 rows).
RETENTION_MS = 2 * 60 * 1000
_PRUNE_EVERY_S = 10.0
_MAX_PENDING = 200_000
_ENDED = ["succeeded", "failed", "canceled"]
_ASKABLE = ["queued", "running"]

Connection = psycopg.Connection[tuple[Any, ...]]
# (task_id, seq, kind, data, urgent)
_Pending = tuple[str, int, str, dict[str, Any], bool]

# A flush is one statement, in a transaction of its own (autocommit): one row per task holding
# its frames of the flush, and the NOTIFY (sent at the commit). The rows go as one JSON document
# of [task_id, first_seq, last_seq, frames] serialised at once in C (orjson): adapting arrays
# element by element cost psycopg ~3x the CPU. A ``json`` value keeps its text, so ``r->3`` is
# the frames exactly as serialised. A flush tried again after a failure whose commit went
# through anyway writes its rows again from the same first frames, with more frames or as many:
# the longer one is kept, and no frame is held twice.
_WRITE = (
    "WITH written AS (INSERT INTO task_events (task_id, first_seq, last_seq, frames) "
    "SELECT r->>0, (r->>1)::int, (r->>2)::int, (r->3)::text "
    "FROM json_array_elements(%s::json) AS r "
    "ON CONFLICT (task_id, first_seq) DO UPDATE "
    "SET last_seq = EXCLUDED.last_seq, frames = EXCLUDED.frames "
    "WHERE task_events.last_seq < EXCLUDED.last_seq) "
    f"SELECT pg_notify('{EVENTS_CHANNEL}', p) FROM unnest(%s::text[]) AS p"
)
_READ = (
    "SELECT t.state, e.frames FROM tasks t LEFT JOIN task_events e "
    "ON e.task_id = t.task_id AND e.last_seq > %s WHERE t.task_id = %s ORDER BY e.first_seq"
)
_READ_MANY = (
    "SELECT w.task_id, t.state, e.frames "
    "FROM unnest(%s::text[], %s::int[]) AS w(task_id, after) "
    "LEFT JOIN tasks t ON t.task_id = w.task_id "
    "LEFT JOIN task_events e ON e.task_id = w.task_id AND e.last_seq > w.after "
    "ORDER BY w.task_id, e.first_seq"
)
_ASK_CANCEL = (
    "WITH asked AS (UPDATE tasks SET cancel_requested_ms = coalesce(cancel_requested_ms, %s) "
    "WHERE task_id = %s AND state = ANY(%s) RETURNING task_id) "
    f"SELECT pg_notify('{CANCEL_CHANNEL}', task_id) FROM asked"
)
# Driven from the transcript's own tasks (few), never a scan of every task ever run.
_PRUNE = (
    "DELETE FROM task_events WHERE task_id IN (SELECT t.task_id FROM "
    "(SELECT DISTINCT task_id FROM task_events) AS e JOIN tasks t ON t.task_id = e.task_id "
    "WHERE t.state = ANY(%s) AND t.ended_ms < %s)"
)


@dataclass
class WriterStats:
    """What the writer did since it started (bench/fanout.py reads it)."""

    flushes: int = 0
    frames: int = 0
    rows: int = 0  # one a task and flush
    notifies: int = 0
    dropped: int = 0
    failures: int = 0
    busy_s: float = 0.0  # thread time spent in flushes (serialising included)


@dataclass(frozen=True)
class Read:
    """A task's frames after some id, and its row's state then (None: no such task)."""

    state: str | None
    frames: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)


class Transcript:
    def __init__(
        self,
        conninfo: str,
        *,
        flush_s: float = 0.005,
        max_batch: int = 500,
        retry_s: float = 1.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._flush_s = flush_s
        self._max_batch = max_batch
        self._retry_s = retry_s
        self._timeout_s = timeout_s
        self._pending: collections.deque[_Pending] = collections.deque()
        self._ready = threading.Event()
        self._urgent = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True},
            timeout=timeout_s,
            name="llorch-events",
            open=False,
        )
        self.stats = WriterStats()

    def start(self) -> None:
        self._pool.open(wait=False)
        self._thread = threading.Thread(target=self._run, name="llorch-pg-events", daemon=True)
        self._thread.start()

    def close(self, wait_s: float = 5.0) -> None:
        """Write what is queued (for up to ``wait_s``), then stop."""
        self._stop.set()
        self._ready.set()
        self._urgent.set()
        if self._thread is not None:
            self._thread.join(timeout=wait_s)
        self._pool.close(timeout=1.0)

    # -- the event loop's side --------------------------------------------------------------

    def append(self, task_id: str, seq: int, kind: str, data: dict[str, Any], urgent: bool) -> None:
        """Queue a frame for the next write; ``urgent`` (a terminal frame): written at once."""
        if len(self._pending) >= _MAX_PENDING:
            self.stats.dropped += 1
            return
        self._pending.append((task_id, seq, kind, data, urgent))
        if urgent:
            self._urgent.set()
            self._ready.set()
        elif not self._ready.is_set():
            self._ready.set()

    # -- reads and the cancel (they block: call them off the loop, but request_cancel) ------

    def read(self, task_id: str, after: int) -> Read:
        """The task's frames with ids above ``after``, and its state, in one round trip."""
        with self._calling() as conn:
            found = conn.execute(_READ, (after, task_id)).fetchall()
        if not found:
            return Read(None)
        return Read(str(found[0][0]), _frames(after, [chunk for _, chunk in found]))

    def read_many(self, after: Mapping[str, int]) -> dict[str, Read]:
        """:meth:`read` of several tasks (task id: the id to read after) in one round trip."""
        if not after:
            return {}
        with self._calling() as conn:
            found = conn.execute(_READ_MANY, (list(after), list(after.values()))).fetchall()
        chunks: dict[str, list[str | None]] = {}
        states: dict[str, str | None] = {}
        for task_id, state, chunk in found:
            states[task_id] = None if state is None else str(state)
            chunks.setdefault(task_id, []).append(chunk)
        return {t: Read(states[t], _frames(after[t], chunks[t])) for t in states}

    def request_cancel(self, task_id: str, now_ms: int) -> bool:
        """Record a cancel on a queued or running task's row and NOTIFY :data:`CANCEL_CHANNEL`
        with its id, in one statement (the notification leaves with the commit); whether the
        task was queued or running."""
        with self._calling() as conn:
            found = conn.execute(_ASK_CANCEL, (now_ms, task_id, _ASKABLE)).fetchall()
        return bool(found)

    def cancels_asked(self, task_ids: Sequence[str]) -> list[str]:
        """Those of ``task_ids`` whose row records a cancel."""
        if not task_ids:
            return []
        with self._calling() as conn:
            found = conn.execute(
                "SELECT task_id FROM tasks WHERE task_id = ANY(%s) "
                "AND cancel_requested_ms IS NOT NULL",
                (list(task_ids),),
            ).fetchall()
        return [str(r[0]) for r in found]

    def _calling(self) -> _Call:
        return _Call(self._pool, self._timeout_s)

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        conn: Connection | None = None
        pruned_at = 0.0
        while True:
            self._ready.wait(timeout=_PRUNE_EVERY_S)
            if not self._urgent.is_set():
                self._urgent.wait(self._flush_s)  # a few ms of frames go in one write
            self._ready.clear()
            self._urgent.clear()
            try:
                conn = conn if conn is not None and not conn.closed else self._connect()
                while self._pending:
                    self._flush(conn)
                if time.monotonic() - pruned_at >= _PRUNE_EVERY_S:
                    self._prune(conn)
                    pruned_at = time.monotonic()
            except psycopg.Error as exc:
                self._failed(conn, exc)
                conn = None
                if self._stop.wait(self._retry_s):
                    return
                self._ready.set()
                continue
            if self._stop.is_set():
                break
        if conn is not None:
            conn.close()

    def _connect(self) -> Connection:
        return psycopg.connect(self._conninfo, autocommit=True)

    def _failed(self, conn: Connection | None, exc: psycopg.Error) -> None:
        self.stats.failures += 1
        if self.stats.failures == 1 or self.stats.failures % 100 == 0:
            log.warning(
                "writing task events failed (%s): %d frames wait, tried again every %g s",
                " ".join(str(exc).split()) or type(exc).__name__,
                len(self._pending),
                self._retry_s,
                extra={"event": "task_events_write_failed"},
            )
        if conn is not None:
            conn.close()

    def _flush(self, conn: Connection) -> None:
        """One statement: up to ``max_batch`` frames in a row per task, and a NOTIFY of them."""
        began = time.thread_time()
        batch: list[_Pending] = []
        while self._pending and len(batch) < self._max_batch:
            batch.append(self._pending.popleft())
        try:
            frames: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
            for task_id, seq, kind, data, _ in batch:
                frames.setdefault(task_id, []).append((seq, kind, data))
            document = orjson.dumps([(t, f[0][0], f[-1][0], f) for t, f in frames.items()])
            payloads = _payloads(list(frames))
            conn.execute(_WRITE, (document.decode(), payloads))
        except BaseException:
            self._pending.extendleft(reversed(batch))  # tried again, in order
            raise
        self.stats.flushes += 1
        self.stats.frames += len(batch)
        self.stats.rows += len(frames)
        self.stats.notifies += len(payloads)
        self.stats.busy_s += time.thread_time() - began

    def _prune(self, conn: Connection) -> None:
        before_ms = int(time.time() * 1000) - RETENTION_MS
        conn.execute(_PRUNE, (_ENDED, before_ms))


def _frames(after: int, chunks: Sequence[str | None]) -> list[tuple[int, str, dict[str, Any]]]:
    """The frames with ids above ``after`` in ``chunks`` (rows in id order; None: no row), each
    once and in order."""
    frames: list[tuple[int, str, dict[str, Any]]] = []
    last = after
    for chunk in chunks:
        if chunk is None:
            continue
        for seq, kind, data in orjson.loads(chunk):
            if seq > last:
                frames.append((seq, kind, data))
                last = seq
    return frames


def _payloads(task_ids: Sequence[str]) -> list[str]:
    """The task ids, space-separated, in as few payloads under NOTIFY's limit as they fit."""
    payloads: list[str] = []
    current: list[str] = []
    size = 0
    for task_id in task_ids:
        if current and size + 1 + len(task_id.encode()) > MAX_PAYLOAD_BYTES:
            payloads.append(" ".join(current))
            current, size = [], 0
        current.append(task_id)
        size += 1 + len(task_id.encode())
    if current:
        payloads.append(" ".join(current))
    return payloads


class _Call:
    """A pooled connection for one call; psycopg's errors become the storage errors."""

    def __init__(self, pool: ConnectionPool[Connection], timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._conn: Connection | None = None

    def __enter__(self) -> Connection:
        try:
            self._conn = self._pool.getconn(timeout=self._timeout_s)
        except psycopg.Error as exc:
            raise StorageUnavailable("the database is unreachable", retry_after_ms=1000) from exc
        return self._conn

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if self._conn is not None:
            self._pool.putconn(self._conn)
        if isinstance(exc, psycopg.OperationalError):
            raise StorageUnavailable(f"the database did not answer: {exc}") from exc
        if isinstance(exc, psycopg.Error):
            raise StorageError(f"storage failure: {exc}") from exc


@dataclass
class ClusterLinks:
    """An instance's links to the others through the database: its transcript and its ears."""

    transcript: Transcript
    listener: Listener


def open_links(url: str, *, timeout_ms: int, retry_ms: int) -> ClusterLinks:
    """The transcript writer and the listener of an instance on ``url`` (not started)."""
    conninfo = _conninfo(url, timeout_ms)
    return ClusterLinks(
        Transcript(conninfo, retry_s=retry_ms / 1000, timeout_s=timeout_ms / 1000),
        Listener(conninfo, retry_s=retry_ms / 1000),
    )
