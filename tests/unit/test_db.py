"""The store, on both backends (SQLite and PostgreSQL): migrations, the profile guard, the
schema check, atomic writes, paging; and what is SQLite's own (empty and corrupt files)."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from llorch.errors import StorageCorrupt, StorageError
from llorch.persistence import ArtifactInsert, Database, SessionRow, Storage, pg_schema
from llorch.persistence import db as db_module
from llorch.persistence.db import ProfileMismatch, SchemaMismatch, check_database, migrations
from llorch.persistence.postgres import PostgresStorage
from tests.support import free_port
from tests.unit.helpers import task_row


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "llorch-test.sqlite3"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    opened = Database.open(path, profile="test")
    yield opened
    opened.close()


@dataclass
class Backend:
    """One storage backend as the tests drive it: how to open it and how another client
    reaches the same database underneath the store."""

    name: str
    open: Callable[..., Storage]  # (profile="test", busy_timeout_ms=5000)
    execute: Callable[[str], None]  # one statement, committed, by another connection
    count: Callable[[str], int]
    tables: Callable[[], set[str]]
    # Another client holding the write lock of every table until the block ends.
    write_lock_held: Callable[[], AbstractContextManager[None]]
    integrity_error: type[Exception]
    lock_error: type[Exception]
    migrations: list[tuple[int, str]]


def sqlite_backend(path: Path) -> Backend:
    def execute(sql: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(sql)

    @contextmanager
    def write_lock_held() -> Iterator[None]:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            yield
            other.execute("ROLLBACK")
        finally:
            other.close()

    def opener(profile: str = "test", busy_timeout_ms: int = 5000) -> Storage:
        return Database.open(path, profile=profile, busy_timeout_ms=busy_timeout_ms)

    return Backend(
        "sqlite",
        opener,
        execute,
        lambda table: count(path, table),
        lambda: tables(path),
        write_lock_held,
        sqlite3.IntegrityError,
        sqlite3.OperationalError,
        migrations(),
    )


def postgres_backend(url: str) -> Backend:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql.encode())
            return cur.fetchall() if cur.description else []

    def execute(sql: str) -> None:
        rows(sql)

    @contextmanager
    def write_lock_held() -> Iterator[None]:
        # EXCLUSIVE: other clients still read, none writes (like SQLite's write lock).
        with psycopg.connect(url) as other:
            other.execute(
                "LOCK TABLE meta, sessions, tasks, artifacts, artifact_views IN EXCLUSIVE MODE"
            )
            yield
            other.rollback()

    def opener(profile: str = "test", busy_timeout_ms: int = 5000) -> Storage:
        return PostgresStorage.open(url, profile=profile, busy_timeout_ms=busy_timeout_ms)

    return Backend(
        "postgres",
        opener,
        execute,
        lambda table: int(rows(f"SELECT count(*) FROM {table}")[0][0]),
        lambda: {
            str(name)
            for (name,) in rows(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        },
        write_lock_held,
        psycopg.IntegrityError,
        psycopg.OperationalError,
        pg_schema.migrations(),
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, path: Path) -> Backend:
    if request.param == "sqlite":
        return sqlite_backend(path)
    # Only now: a run of the SQLite cases alone starts no PostgreSQL.
    return postgres_backend(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(backend: Backend) -> Iterator[Storage]:
    opened = backend.open()
    yield opened
    opened.close()


def session_row(session_id: str = "s-1", **changes: Any) -> SessionRow:
    row = SessionRow(
        session_id=session_id,
        created_ms=1_000,
        last_used_ms=1_000,
        ttl_ms=60_000,
        turns=0,
        max_turns=10,
        tokens_remaining=1_000,
        time_ms_remaining=10_000,
        cost_remaining=1.5,
    )
    return dataclasses.replace(row, **changes)


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        found: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()
    return found


def test_the_migrations_are_numbered_sql_files_in_order() -> None:
    found = migrations()

    assert [number for number, _ in found] == list(range(1, len(found) + 1))
    assert "CREATE TABLE" in found[0][1]


@pytest.mark.req("ORCH-STATE-0007")
def test_postgresql_has_a_migration_for_every_number_sqlite_has() -> None:
    # PostgreSQL may have more: the tables only several instances need (0008 the shared queue
    # and slot leases, 0010 the state they share) have no SQLite migration.
    pg = [n for n, _ in pg_schema.migrations()]
    assert {n for n, _ in migrations()} <= set(pg)
    assert pg == list(range(1, len(pg) + 1))


@pytest.mark.req("ORCH-DATA-0095", "ORCH-STATE-0007")
def test_opening_a_new_database_migrates_it_and_records_its_version(
    backend: Backend, store: Storage
) -> None:
    assert store.schema_version() == backend.migrations[-1][0]
    assert {"meta", "sessions", "tasks", "artifacts", "artifact_views"} <= backend.tables()


@pytest.mark.req("ORCH-DATA-0095", "ORCH-STATE-0007")
def test_reopening_a_migrated_database_is_idempotent_and_keeps_the_data(
    backend: Backend, store: Storage
) -> None:
    store.insert_session(session_row())
    store.close()

    for _ in range(2):
        again = backend.open()
        try:
            assert again.schema_version() == backend.migrations[-1][0]
            assert again.get_session("s-1") == session_row()
        finally:
            again.close()


@pytest.mark.req("ORCH-DATA-0094", "ORCH-STATE-0007")
def test_a_database_refuses_to_be_opened_by_another_profile(backend: Backend) -> None:
    backend.open(profile="dev").close()

    with pytest.raises(ProfileMismatch, match=r"'dev'.*'prod'"):
        backend.open(profile="prod")
    with pytest.raises(ProfileMismatch):
        backend.open(profile="test")
    backend.open(profile="dev").close()


@pytest.mark.req("ORCH-STATE-0003")
def test_an_empty_or_corrupt_file_is_refused_and_left_as_it_was(path: Path) -> None:
    check_database(path)  # absent: a new database, created by open
    path.parent.mkdir(parents=True)
    path.touch()
    for refuse in (check_database, lambda p: Database.open(p, profile="test")):
        with pytest.raises(StorageCorrupt, match="empty file"):
            refuse(path)
    assert path.stat().st_size == 0
    path.write_bytes(b"not a database, " * 512)
    for refuse in (check_database, lambda p: Database.open(p, profile="test")):
        with pytest.raises(StorageCorrupt, match="is corrupt: file is not a database"):
            refuse(path)
    assert path.read_bytes() == b"not a database, " * 512


@pytest.mark.req("ORCH-STATE-0003")
def test_open_reads_a_file_through_once_after_check_database_passed_it_unchanged(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Database.open(path, profile="test").close()
    checks: list[Path] = []
    real = db_module._quick_check

    def counted(conn: sqlite3.Connection, checked: Path) -> None:
        checks.append(checked)
        real(conn, checked)

    monkeypatch.setattr(db_module, "_quick_check", counted)
    check_database(path)
    Database.open(path, profile="test").close()
    assert checks == [path]  # the start-up's check; open trusted the unchanged file
    # A file changed since its check is checked again by open (here: found corrupt).
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(StorageCorrupt, match="is corrupt"):
        Database.open(path, profile="test")
    assert checks == [path, path]


@pytest.mark.req("ORCH-DATA-0095", "ORCH-STATE-0007")
@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ("CREATE TABLE intruder (x INTEGER)", "intruder"),
        ("DROP INDEX tasks_by_state", "tasks_by_state"),
        ("ALTER TABLE tasks ADD COLUMN surprise TEXT", "tasks"),
    ],
    ids=["extra-table", "missing-index", "changed-table"],
)
def test_a_live_schema_that_differs_from_the_migrations_is_refused(
    backend: Backend, store: Storage, tamper: str, named: str
) -> None:
    store.close()
    backend.execute(tamper)

    with pytest.raises(SchemaMismatch, match=named):
        backend.open()


@pytest.mark.req("ORCH-STATE-0007")
def test_sessions_are_inserted_read_and_soft_deleted(store: Storage) -> None:
    store.insert_session(session_row(turns=3, last_pool_id="default", last_replica_id="default-0"))

    row = store.get_session("s-1")
    assert row == session_row(turns=3, last_pool_id="default", last_replica_id="default-0")
    assert store.get_session("s-unknown") is None

    assert store.delete_session("s-1") is True
    assert store.get_session("s-1") is None
    assert store.delete_session("s-1") is False


@pytest.mark.req("ORCH-DATA-0011", "ORCH-STATE-0007")
def test_admit_task_writes_the_task_and_a_new_session_together(store: Storage) -> None:
    seq = store.admit_task(task_row("t-1", session_id="s-1"), session_row(), new_session=True)

    stored = store.get_task("t-1")
    assert stored == dataclasses.replace(task_row("t-1", session_id="s-1"), seq=seq)
    assert seq >= 1
    assert store.get_session("s-1") == session_row()


@pytest.mark.req("ORCH-DATA-0011", "ORCH-DATA-0072")
def test_admit_task_records_the_use_of_an_existing_session(store: Storage) -> None:
    store.insert_session(session_row())

    store.admit_task(task_row("t-1"), session_row(turns=1, last_used_ms=5_000), new_session=False)

    row = store.get_session("s-1")
    assert row is not None
    assert (row.turns, row.last_used_ms) == (1, 5_000)


@pytest.mark.req("ORCH-DATA-0019")
def test_a_failed_admission_leaves_neither_task_nor_session(
    backend: Backend, store: Storage
) -> None:
    store.admit_task(task_row("t-1", session_id="s-1"), session_row("s-1"), new_session=True)

    # The task id is taken: the insert fails after the new session was written in the same
    # transaction, which must be rolled back.
    with pytest.raises(StorageError) as caught:
        store.admit_task(task_row("t-1", session_id="s-2"), session_row("s-2"), new_session=True)

    assert isinstance(caught.value.__cause__, backend.integrity_error)
    assert caught.value.code == "INTERNAL"
    assert store.get_session("s-2") is None
    assert backend.count("tasks") == 1


@pytest.mark.req("ORCH-DATA-0082")
def test_finish_task_writes_task_and_session_together_or_not_at_all(store: Storage) -> None:
    store.admit_task(task_row("t-1"), session_row(), new_session=True)

    with pytest.raises(StorageError):
        store.finish_task("t-1", {"state": "succeeded"}, "s-1", {"no_such_column": 1})
    task = store.get_task("t-1")
    assert task is not None and task.state == "queued"

    store.finish_task(
        "t-1",
        {"state": "failed", "error_code": "WORKER_RESET", "error_retriable": True},
        "s-1",
        {"tokens_remaining": 900, "cost_remaining": 1.25},
    )
    task = store.get_task("t-1")
    session = store.get_session("s-1")
    assert task is not None and session is not None
    assert (task.state, task.error_code, task.error_retriable) == ("failed", "WORKER_RESET", True)
    assert (session.tokens_remaining, session.cost_remaining) == (900, 1.25)


def test_place_task_records_the_start_and_the_session_placement_together(
    backend: Backend, store: Storage
) -> None:
    store.admit_task(task_row("t-1"), session_row(), new_session=True)

    store.place_task(
        "t-1", "s-1", pool_id="default", replica_id="default-1", state="running", started_ms=2_000
    )

    task, session = store.get_task("t-1"), store.get_session("s-1")
    assert task is not None and session is not None
    assert (task.state, task.started_ms, task.replica_id) == ("running", 2_000, "default-1")
    assert (session.last_pool_id, session.last_replica_id) == ("default", "default-1")
    assert session == session_row(last_pool_id="default", last_replica_id="default-1")

    # One transaction: with the database locked, neither row changes.
    store.close()
    impatient = backend.open(busy_timeout_ms=50)
    try:
        with backend.write_lock_held(), pytest.raises(StorageError):
            impatient.place_task(
                "t-1", "s-1", pool_id="p2", replica_id="p2-0", state="failed", started_ms=3_000
            )
        task, session = impatient.get_task("t-1"), impatient.get_session("s-1")
        assert task is not None and session is not None
        assert (task.state, task.started_ms, session.last_pool_id) == ("running", 2_000, "default")
    finally:
        impatient.close()


@pytest.mark.req("ORCH-DATA-0041")
def test_list_tasks_is_newest_first_and_pages_with_before_seq(store: Storage) -> None:
    store.insert_session(session_row("s-1"))
    store.insert_session(session_row("s-2"))
    seqs = {}
    for i in range(5):
        session_id = "s-1" if i % 2 == 0 else "s-2"
        seqs[f"t-{i}"] = store.admit_task(
            task_row(f"t-{i}", session_id=session_id), session_row(session_id), new_session=False
        )
    store.update_task("t-4", state="succeeded")

    first = store.list_tasks(session_id=None, state=None, limit=2, before_seq=None)
    assert [t.task_id for t in first] == ["t-4", "t-3"]
    second = store.list_tasks(session_id=None, state=None, limit=2, before_seq=first[-1].seq)
    assert [t.task_id for t in second] == ["t-2", "t-1"]
    third = store.list_tasks(session_id=None, state=None, limit=2, before_seq=second[-1].seq)
    assert [t.task_id for t in third] == ["t-0"]
    assert [t.seq for t in first + second + third] == sorted(seqs.values(), reverse=True)

    by_session = store.list_tasks(session_id="s-1", state=None, limit=10, before_seq=None)
    assert [t.task_id for t in by_session] == ["t-4", "t-2", "t-0"]
    by_state = store.list_tasks(session_id="s-1", state="queued", limit=10, before_seq=None)
    assert [t.task_id for t in by_state] == ["t-2", "t-0"]
    assert [t.task_id for t in store.tasks_in_states(["queued"])] == ["t-0", "t-1", "t-2", "t-3"]
    assert store.tasks_in_states([]) == []


@pytest.mark.req("ORCH-STATE-0007")
def test_progress_is_checkpointed_for_every_running_task_at_once(store: Storage) -> None:
    for task_id in ("t-1", "t-2"):
        store.admit_task(task_row(task_id), session_row(), new_session=task_id == "t-1")

    store.record_progress([("t-1", 5), ("t-2", 7)], 9_000)
    store.record_progress([], 9_500)

    rows = [store.get_task(t) for t in ("t-1", "t-2")]
    assert [(r.tokens_out, r.progress_ms) for r in rows if r is not None] == [
        (5, 9_000),
        (7, 9_000),
    ]


@pytest.mark.req("ORCH-DATA-0019")
def test_a_locked_database_makes_writes_fail_with_a_storage_error(
    backend: Backend, store: Storage
) -> None:
    store.close()
    impatient = backend.open(busy_timeout_ms=50)
    try:
        with backend.write_lock_held():
            with pytest.raises(StorageError) as caught:
                impatient.admit_task(task_row("t-1"), session_row(), new_session=True)
            assert isinstance(caught.value.__cause__, backend.lock_error)
            assert caught.value.retriable is True
            with pytest.raises(StorageError):
                impatient.insert_session(session_row("s-2"))
            with pytest.raises(StorageError):
                impatient.update_task("t-1", state="running")
            assert impatient.write_failing and not impatient.probe_write()

        # Nothing was half-written while the lock was held.
        assert impatient.get_task("t-1") is None
        assert impatient.get_session("s-1") is None
        assert impatient.get_session("s-2") is None
        # And the store works again once the lock is gone.
        assert impatient.probe_write()
        impatient.admit_task(task_row("t-1"), session_row(), new_session=True)
        assert impatient.get_task("t-1") is not None
    finally:
        impatient.close()


def trace_row(task_id: str, **changes: Any) -> ArtifactInsert:
    row = ArtifactInsert(
        artifact_id="sha256:" + "ab" * 32,
        digest="ab" * 32,
        kind="trace",
        size_bytes=2,
        created_ms=1,
        tags='["task-trace"]',
        parent=None,
        task_id=task_id,
        metadata="{}",
        owner="key-1",
    )
    return dataclasses.replace(row, **changes)


def test_finish_task_stores_the_trace_row_in_the_same_transaction(store: Storage) -> None:
    store.admit_task(task_row("t-1"), session_row(), new_session=True)
    trace = trace_row("t-1")

    with pytest.raises(StorageError):
        store.finish_task("t-1", {"state": "succeeded"}, "s-1", {"no_such_column": 1}, trace=trace)
    assert store.get_artifact(trace.artifact_id) is None

    store.finish_task(
        "t-1",
        {"state": "succeeded", "trace_artifact_id": trace.artifact_id},
        "s-1",
        {"tokens_remaining": 900},
        trace=trace,
    )
    task = store.get_task("t-1")
    stored = store.get_artifact(trace.artifact_id)
    assert task is not None and stored is not None
    assert task.trace_artifact_id == trace.artifact_id
    assert (stored["kind"], stored["task_id"], stored["size_bytes"]) == ("trace", "t-1", 2)
    assert store.insert_artifact(trace) is False  # stored once


@pytest.mark.req("ORCH-SEC-0023", "ORCH-STATE-0007")
def test_each_owner_sees_its_own_view_of_shared_content(store: Storage) -> None:
    first = trace_row("t-1", kind="document", tags='["a", "b"]', owner="alice")
    assert store.insert_artifact(first) is True
    assert store.insert_artifact(first) is False
    bob = dataclasses.replace(first, kind="prompt", tags='["c"]', created_ms=5, owner="bob")
    assert store.insert_artifact(bob) is True
    anonymous = trace_row("t-9", artifact_id="sha256:" + "cd" * 32, digest="cd" * 32, owner=None)
    assert store.insert_artifact(anonymous) is True
    assert store.insert_artifact(anonymous) is False

    shared = first.artifact_id
    assert store.artifact_owned_by(shared, "bob") and not store.artifact_owned_by(shared, "carol")
    as_bob = store.get_artifact(shared, "bob")
    assert as_bob is not None and (as_bob["kind"], as_bob["tags"], as_bob["created_ms"]) == (
        "prompt",
        '["c"]',
        5,
    )
    as_carol = store.get_artifact(shared, "carol")  # no view of its own: the first store's
    assert as_carol is not None and as_carol == store.get_artifact(shared)
    assert as_carol["kind"] == "document"

    def ids(**query: Any) -> list[tuple[str, str]]:
        found = store.list_artifacts(
            kind=query.pop("kind", None),
            tag=query.pop("tag", None),
            task_id=query.pop("task_id", None),
            limit=10,
            before_seq=query.pop("before_seq", None),
            **query,
        )
        return [(a["artifact_id"][7:9], a["kind"]) for a in found]

    assert ids() == [("cd", "trace"), ("ab", "document")]
    assert ids(viewer="bob") == [("cd", "trace"), ("ab", "prompt")]
    assert ids(owner="bob") == [("ab", "prompt")]
    assert ids(owner="alice", tag="b") == [("ab", "document")]
    assert ids(tag="c") == [] and ids(tag="c", viewer="bob") == [("ab", "prompt")]
    assert ids(kind="trace", task_id="t-9") == [("cd", "trace")]
    newest = store.list_artifacts(
        kind=None, tag=None, task_id=None, limit=1, before_seq=None, owner=None
    )
    assert ids(before_seq=newest[0]["seq"]) == [("ab", "document")]


@pytest.mark.req("ORCH-STATE-0007")
def test_rows_read_back_the_same_from_both_backends(path: Path, postgres_url: str) -> None:
    stores = [sqlite_backend(path).open(), postgres_backend(postgres_url).open()]
    try:
        answers = []
        for store in stores:
            store.admit_task(task_row("t-1"), session_row(cost_remaining=0.1), new_session=True)
            store.place_task("t-1", "s-1", pool_id="p", replica_id="p-0", started_ms=7)
            trace = trace_row("t-1", metadata='{"k":  "v"}')
            store.finish_task(
                "t-1",
                {"state": "failed", "error_retriable": False, "cost": 1e-9, "tokens_out": 2**40},
                "s-1",
                {"cost_remaining": 0.1 - 1e-9},
                trace=trace,
            )
            answers.append(
                (
                    store.get_task("t-1"),
                    store.get_session("s-1"),
                    store.get_artifact(trace.artifact_id),
                    store.get_artifact(trace.artifact_id, "key-1"),
                    store.list_artifacts(
                        kind=None, tag=None, task_id=None, limit=5, before_seq=None, owner="key-1"
                    ),
                )
            )
        assert answers[0] == answers[1]
        task = answers[1][0]
        assert task is not None and task.error_retriable is False
    finally:
        for store in stores:
            store.close()


@pytest.mark.req("ORCH-CTRL-0042")
def test_the_outcome_of_the_most_recent_write_is_recorded(store: Storage) -> None:
    def failing() -> bool:  # calls, so that mypy does not narrow the attributes
        return store.write_failing

    assert not failing()
    store.admit_task(task_row("t-1"), session_row(), new_session=True)

    # The session's insert succeeds inside the transaction; the task's then fails: failing.
    with pytest.raises(StorageError):
        store.admit_task(task_row("t-1", session_id="s-2"), session_row("s-2"), new_session=True)
    assert failing()

    # A read, successful or not, leaves it as it is.
    assert store.get_task("t-1") is not None
    assert failing()

    store.update_task("t-1", state="running")
    assert not failing()


@pytest.mark.req("ORCH-SEC-0023")
def test_the_views_migration_keeps_every_existing_owners_metadata(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in migrations():
        if number <= 4:
            conn.executescript(script)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(_ARTIFACT_AT_VERSION_4)
    for owner in ("alice", "bob"):
        conn.execute("INSERT INTO artifact_owners VALUES ('sha256:ab', ?)", (owner,))
    conn.close()

    _check_views_kept(Database.open(path, profile="test"), lambda: tables(path))


@pytest.mark.req("ORCH-SEC-0023", "ORCH-STATE-0007")
def test_the_postgresql_views_migration_keeps_every_existing_owners_metadata(
    postgres_url: str,
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        pg_schema.migrate(conn, up_to=4)
        assert pg_schema.schema_version(conn) == 4
        conn.execute(_ARTIFACT_AT_VERSION_4)
        for owner in ("alice", "bob"):
            conn.execute("INSERT INTO artifact_owners VALUES ('sha256:ab', %s)", (owner,))

    backend = postgres_backend(postgres_url)
    _check_views_kept(backend.open(), backend.tables)


_ARTIFACT_AT_VERSION_4 = (
    "INSERT INTO artifacts (artifact_id, digest, kind, size_bytes, created_ms, tags, "
    "metadata) VALUES ('sha256:ab', 'ab', 'prompt', 1, 7, '[\"t\"]', '{\"k\": \"v\"}')"
)


def _check_views_kept(db: Storage, tables_now: Callable[[], set[str]]) -> None:
    try:
        for owner in ("alice", "bob"):
            assert db.artifact_owned_by("sha256:ab", owner)
            view = db.get_artifact("sha256:ab", owner)
            assert view is not None
            assert (view["kind"], view["tags"], view["metadata"]) == (
                "prompt",
                '["t"]',
                '{"k": "v"}',
            )
            assert view["created_ms"] == 7
        assert not db.artifact_owned_by("sha256:ab", "carol")
        assert "artifact_owners" not in tables_now()
    finally:
        db.close()


@pytest.mark.req("ORCH-STATE-0008")
def test_an_unreachable_postgresql_is_a_storage_error_that_hides_the_password() -> None:
    url = f"postgresql://llorch:s3cret@127.0.0.1:{free_port()}/llorch"

    with pytest.raises(
        StorageError, match=r"cannot open database postgresql://llorch:\*\*\*@"
    ) as e:
        PostgresStorage.open(url, profile="test")
    assert "s3cret" not in str(e.value)


@pytest.mark.req("ORCH-CTRL-0023", "ORCH-STATE-0007")
def test_a_tag_filter_matches_whole_tags_whatever_they_hold(store: Storage) -> None:
    # Tags as the artifact store writes them (json.dumps); it refuses a NUL character, which
    # neither backend's JSON functions give back whole.
    tags = ["쁞J8_", 'a"b%', "x/y"]
    row = trace_row("t-1", kind="document", tags=json.dumps(tags), owner="alice")
    assert store.insert_artifact(row) is True

    def found(tag: str) -> list[str]:
        page = store.list_artifacts(kind=None, tag=tag, task_id=None, limit=10, before_seq=None)
        return [a["artifact_id"] for a in page]

    for tag in tags:
        assert found(tag) == [row.artifact_id], tag
    for other in ("x", "쁞", "%", "a"):
        assert found(other) == [], other
