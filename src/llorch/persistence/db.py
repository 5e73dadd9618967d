"""The embedded store: one SQLite database (WAL) per profile.

Every ``sqlite3.Error`` is translated here, once, into :class:`llorch.errors.StorageError` with the
cause kept. Writes happen at admission, at dispatch and at the end of a task: never per token.
The outcome of every write is kept (:attr:`Database.write_failing`): readiness reports it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from llorch.errors import StorageBusy, StorageCorrupt, StorageError
from llorch.persistence import rows
from llorch.persistence.cluster import Cluster
from llorch.persistence.group_sync import GroupSync
from llorch.persistence.rows import (
    ADMIT_COLUMNS,
    SESSION_COLUMNS,
    TASK_COLUMNS,
    ArtifactInsert,
    Reservation,
    SessionRow,
    TaskRow,
)

_OWN_VIEWS = rows.own_views("?")
_SHOWN = {viewer: rows.shown(viewer, "?") for viewer in (False, True)}


class ProfileMismatch(RuntimeError):
    """The database belongs to another profile (dev, test, prod)."""


class SchemaMismatch(RuntimeError):
    """The live schema differs from the one the migrations produce."""


_INSERT_SESSION = (
    f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in SESSION_COLUMNS)})"
)
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(ADMIT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in ADMIT_COLUMNS)})"
)

# SQLITE_BUSY and SQLITE_LOCKED: the primary result codes (the low byte of extended ones).
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}

_PLACE_SESSION = "UPDATE sessions SET last_pool_id = ?, last_replica_id = ? WHERE session_id = ?"


def migrations() -> list[tuple[int, str]]:
    """The numbered SQLite migration scripts, in order."""
    return rows.numbered_scripts("migrations")


def check_database(path: Path) -> None:
    """Refuse, with :class:`StorageCorrupt`, an existing database file that is empty or fails
    ``PRAGMA quick_check``; an absent file passes (:meth:`Database.open` creates it). Only reads:
    the start-up runs this before the server, so a refusal is one line and not a traceback."""
    if not path.exists():
        return
    _refuse_empty(path)
    try:
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            _quick_check(conn, path)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc
    _CHECKED.add(_identity(path))


# Files check_database passed, as (path, size, mtime): Database.open does not read a large file
# through a second time when nothing changed it since (the start-up checks, then opens).
_CHECKED: set[tuple[str, int, int]] = set()


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _refuse_empty(path: Path) -> None:
    # SQLite takes a zero-byte file for a new database: it would start empty, silently.
    if path.is_file() and path.stat().st_size == 0:
        raise StorageCorrupt(
            f"database {path} is an empty file (0 bytes); refusing to start on it as a new "
            "database (restore it from a backup, or remove it to start afresh)"
        )


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """StorageCorrupt unless ``PRAGMA quick_check`` answers 'ok'; other SQLite errors pass up."""
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "not a database" not in text and "malformed" not in text:
            raise
        found = [text]
    if found != ["ok"]:
        more = f" (and {len(found) - 1} more problems)" if len(found) > 1 else ""
        detail = " ".join((found[0] if found else "no answer").split())
        raise StorageCorrupt(
            f"database {path} is corrupt: {detail}{more}; refusing to start on it "
            "(restore it from a backup)"
        )


T = TypeVar("T")
P = ParamSpec("P")


class Database:
    # Calls run inline (Storage.run): a local file answers in microseconds, and the one
    # connection is not thread-safe.
    offloads = False
    # Session reservations are held by the one process (SessionService), not in the file.
    holds_reservations = False
    # One process: nothing is shared with other instances.
    cluster: Cluster | None = None

    def __init__(self, conn: sqlite3.Connection, sync: GroupSync | None = None) -> None:
        self._conn = conn
        # Makes commits durable: SQLite's own commits only reach the OS (synchronous=NORMAL).
        self._sync = sync
        # Whether the most recent write raised StorageError (locked past the busy timeout, a
        # full disk, a corrupt page); the next write that succeeds clears it.
        self.write_failing = False
        # How long a write may wait for another connection's write lock, in all; the wait is
        # when_free's, between tries, never SQLite's, which would block the event loop.
        self.busy_budget_s = 5.0

    @classmethod
    def open(cls, path: Path, *, profile: str, busy_timeout_ms: int = 5000) -> Database:
        """Open (creating if needed), migrate, check the profile and verify the schema."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _refuse_empty(path)
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        try:
            if _identity(path) not in _CHECKED:
                _quick_check(conn, path)  # before anything writes to the file
            conn.execute("PRAGMA journal_mode=WAL")
            # A commit is made durable by GroupSync's fsync of the log, shared by every commit
            # before it, off the event loop: FULL would fsync on the loop at every commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        sync = GroupSync(path)
        db = cls(conn, sync)
        try:
            db._migrate()  # before serving: waiting out another writer here blocks nobody
            db._claim_profile(profile)
            db._verify_schema()
            sync.sync_now()  # the migrations durable before anything is served
            conn.execute("PRAGMA busy_timeout = 0")
            db.busy_budget_s = busy_timeout_ms / 1000
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return db

    def close(self) -> None:
        self._conn.close()

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)``, inline: nothing else runs on the loop meanwhile."""
        return call(*args, **kwargs)

    @property
    def needs_sync(self) -> bool:
        """Whether a commit made here is not durable yet (see :meth:`durable`)."""
        return self._sync is not None and self._sync.pending

    async def durable(self) -> None:
        """Return once every commit made before the call is durable: one fsync of the
        write-ahead log, off the event loop, shared by every caller waiting for it."""
        if self._sync is not None:
            await self._sync.durable()

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every commit made so far is durable (at once if it is)."""
        if self._sync is None:
            callback()
        else:
            self._sync.when_durable(callback)

    # -- start-up ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version()
        for number, script in migrations():
            if number <= current:
                continue
            # executescript commits first, so the transaction is spelled out in the script run.
            self._conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    def _claim_profile(self, profile: str) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'profile'").fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('profile', ?)", (profile,))
        elif row[0] != profile:
            raise ProfileMismatch(
                f"this database belongs to profile {row[0]!r}; refusing to open it as {profile!r}"
            )

    def _verify_schema(self) -> None:
        expected = sqlite3.connect(":memory:")
        try:
            for _, script in migrations():
                expected.executescript(script)
            want = _schema_of(expected)
        finally:
            expected.close()
        have = _schema_of(self._conn)
        if want != have:
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            changed = sorted(n for n in set(want) & set(have) if want[n] != have[n])
            raise SchemaMismatch(
                f"live schema differs from migrations: missing {missing}, "
                f"unexpected {extra}, changed {changed}"
            )

    # -- sessions ---------------------------------------------------------------------------

    def insert_session(self, row: SessionRow) -> None:
        # Not dataclasses.astuple: it deep-copies every value, and a row holds only scalars.
        with self._write():
            self._conn.execute(_INSERT_SESSION, [getattr(row, c) for c in SESSION_COLUMNS])

    def get_session(self, session_id: str) -> SessionRow | None:
        cols = ", ".join(SESSION_COLUMNS)
        with self._errors():
            found = self._conn.execute(
                f"SELECT {cols} FROM sessions WHERE session_id = ? AND deleted = 0", (session_id,)
            ).fetchone()
        return SessionRow(*found) if found else None

    def delete_session(self, session_id: str) -> bool:
        with self._write():
            cur = self._conn.execute(
                "UPDATE sessions SET deleted = 1 WHERE session_id = ? AND deleted = 0",
                (session_id,),
            )
        return cur.rowcount > 0

    def admit_task(
        self,
        task: TaskRow,
        session: SessionRow,
        *,
        new_session: bool,
        reservation: Reservation | None = None,
    ) -> int:
        """Persist an accepted task and its session's use in one transaction; returns its seq.
        ``reservation`` is not stored: one process holds them (SessionService)."""
        values = [getattr(task, c) for c in ADMIT_COLUMNS]
        with self._write(), self._transaction():
            if new_session:
                self.insert_session(session)
            else:
                self._conn.execute(
                    "UPDATE sessions SET last_used_ms = ?, turns = ? WHERE session_id = ?",
                    (session.last_used_ms, session.turns, session.session_id),
                )
            cur = self._conn.execute(_INSERT_TASK, values)
        return int(cur.lastrowid or 0)

    def get_task(self, task_id: str) -> TaskRow | None:
        with self._errors():
            found = self._conn.execute(
                f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
        return rows.task_row(found) if found else None

    def update_task(self, task_id: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._write():
            self._conn.execute(
                f"UPDATE tasks SET {sets} WHERE task_id = ?", (*values.values(), task_id)
            )

    def place_task(
        self, task_id: str, session_id: str, *, pool_id: str, replica_id: str, **task_values: Any
    ) -> None:
        """Record that a task runs on a replica (with its other changed columns, e.g. its start)
        and its session's placement, in one transaction."""
        sets = ", ".join(f"{k} = ?" for k in ("replica_id", *task_values))
        with self._write(), self._transaction():
            self._conn.execute(
                f"UPDATE tasks SET {sets} WHERE task_id = ?",
                (replica_id, *task_values.values(), task_id),
            )
            self._conn.execute(_PLACE_SESSION, (pool_id, replica_id, session_id))

    def finish_task(
        self,
        task_id: str,
        task_values: dict[str, Any],
        session_id: str,
        session_values: dict[str, Any],
        trace: ArtifactInsert | None = None,
        used: Reservation | None = None,
    ) -> Reservation | None:
        """Record a task's terminal state and commit its session's usage together, with the
        row of its trace artifact when there is one (one transaction for all three).
        ``session_values`` carry the charge (SessionService.settle); ``used`` is unused here."""
        task_sets = ", ".join(f"{k} = ?" for k in task_values)
        session_sets = ", ".join(f"{k} = ?" for k in session_values)
        with self._write(), self._transaction():
            if trace is not None:
                self._insert_artifact(trace)
            self._conn.execute(
                f"UPDATE tasks SET {task_sets} WHERE task_id = ?", (*task_values.values(), task_id)
            )
            if session_values:
                self._conn.execute(
                    f"UPDATE sessions SET {session_sets} WHERE session_id = ?",
                    (*session_values.values(), session_id),
                )
        return None

    def record_progress(self, progress: Sequence[tuple[str, int]], now_ms: int) -> None:
        """Checkpoint the tokens running tasks have produced so far, in one transaction."""
        with self._write(), self._transaction():
            self._conn.executemany(
                "UPDATE tasks SET tokens_out = ?, progress_ms = ? WHERE task_id = ?",
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
        query, params = rows.task_list("?", session_id, state, before_seq, owner, limit)
        with self._errors():
            found = self._conn.execute(query, params).fetchall()
        return [rows.task_row(r) for r in found]

    def tasks_in_states(self, states: Sequence[str]) -> list[TaskRow]:
        marks = ", ".join("?" for _ in states)
        with self._errors():
            found = self._conn.execute(
                f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks WHERE state IN ({marks}) "
                "ORDER BY seq",
                tuple(states),
            ).fetchall()
        return [rows.task_row(r) for r in found]

    def probe_write(self) -> bool:
        """While writes fail, try one of a page (the write lock taken, a row of ``meta``
        rewritten, a commit made): readiness must recover even on a server taken out of
        rotation, which gets no writes of its own, and must not while a full disk refuses the
        log a page. Returns whether storage takes writes again."""
        try:
            with self._write(), self._transaction():
                self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('write_probe', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(time.time_ns()),),
                )
        except StorageError:
            return False
        return True

    # -- helpers ----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY:
                raise StorageBusy(f"storage busy: {exc}") from exc
            raise StorageError(f"storage failure: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Like :meth:`_errors`, for a write: records whether it succeeded."""
        try:
            with self._errors():
                yield
        except StorageError:
            self.write_failing = True
            raise
        self.write_failing = False
        if self._sync is not None:
            self._sync.note_commit()

    # -- artifacts --------------------------------------------------------------------------
    # An artifact row travels as a dict keyed by column name; `tags` (a JSON array of strings)
    # and `metadata` (a JSON object of strings) stay JSON text here, like a task's request_json.

    def insert_artifact(self, artifact: ArtifactInsert) -> bool:
        """Record an artifact; True when this is its owner's first store of the content.

        The content's row is written once, by its first store. An ``owner`` gets a view of its
        own (kind, tags, parent, task, metadata, time), written by its first store only; without
        an owner (authentication off) True means the content was not stored before.
        """
        with self._write(), self._transaction():
            return self._insert_artifact(artifact)

    def _insert_artifact(self, a: ArtifactInsert) -> bool:
        values = (a.artifact_id, a.digest, a.kind, a.size_bytes, a.created_ms, a.tags, a.parent)
        cur = self._conn.execute(
            "INSERT INTO artifacts (artifact_id, digest, kind, size_bytes, created_ms, tags, "
            "parent, task_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (artifact_id) DO NOTHING",
            (*values, a.task_id, a.metadata),
        )
        if a.owner is None:
            return cur.rowcount > 0
        view = self._conn.execute(
            "INSERT INTO artifact_views (artifact_id, owner, kind, created_ms, tags, parent, "
            "task_id, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (artifact_id, owner) DO NOTHING",
            (a.artifact_id, a.owner, a.kind, a.created_ms, a.tags, a.parent, a.task_id, a.metadata),
        )
        return view.rowcount > 0

    def artifact_owned_by(self, artifact_id: str, owner: str) -> bool:
        with self._errors():
            found = self._conn.execute(
                "SELECT 1 FROM artifact_views WHERE artifact_id = ? AND owner = ?",
                (artifact_id, owner),
            ).fetchone()
        return found is not None

    def get_artifact(self, artifact_id: str, viewer: str | None = None) -> dict[str, Any] | None:
        """The artifact as ``viewer`` stored it when it has a view of its own, else as its
        first store did (None: the content is not stored)."""
        with self._errors():
            cur = self._conn.execute(
                f"SELECT * FROM ({_SHOWN[viewer is not None]}) WHERE artifact_id = ?",
                (viewer, artifact_id),
            )
            found = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], found, strict=True)) if found else None

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
        """Newest first; `tag` matches one element of the tags array exactly. `owner` given:
        only the artifacts that owner stored, each as it stored it, ordered by when it did.
        Otherwise every artifact, as `viewer` stored it when it did, else as its first store did;
        the filters apply to what is shown."""
        where, params = rows.where(
            ("kind = ?", kind),
            ("EXISTS (SELECT 1 FROM json_each(shown.tags) WHERE json_each.value = ?)", tag),
            ("task_id = ?", task_id),
            ("seq < ?", before_seq),
        )
        source = _OWN_VIEWS if owner is not None else _SHOWN[viewer is not None]
        with self._errors():
            cur = self._conn.execute(
                f"SELECT * FROM ({source}) AS shown {where} ORDER BY seq DESC LIMIT ?",
                (owner if owner is not None else viewer, *params, limit),
            )
            found = cur.fetchall()
        columns = [d[0] for d in cur.description]
        return [dict(zip(columns, row, strict=True)) for row in found]


def _schema_of(conn: sqlite3.Connection) -> dict[str, str]:
    rows = conn.execute(
        "SELECT type || ':' || name, sql FROM sqlite_master "
        "WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {name: " ".join(sql.split()) for name, sql in rows}
