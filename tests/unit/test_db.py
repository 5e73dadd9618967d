"""The SQLite store: migrations, the profile guard, the schema check, atomic writes, paging."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llorch.errors import StorageCorrupt, StorageError
from llorch.persistence import ArtifactInsert, Database, SessionRow
from llorch.persistence.db import ProfileMismatch, SchemaMismatch, check_database, migrations
from tests.unit.helpers import task_row


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "llorch-test.sqlite3"


@pytest.fixture
def db(path: Path) -> Iterator[Database]:
    opened = Database.open(path, profile="test")
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


@pytest.mark.req("ORCH-DATA-0095")
def test_opening_a_new_database_migrates_it_and_sets_user_version(path: Path, db: Database) -> None:
    assert path.exists()
    assert db.schema_version() == migrations()[-1][0]
    assert {"meta", "sessions", "tasks"} <= tables(path)


@pytest.mark.req("ORCH-DATA-0095")
def test_reopening_a_migrated_database_is_idempotent_and_keeps_the_data(
    path: Path, db: Database
) -> None:
    db.insert_session(session_row())
    db.close()

    for _ in range(2):
        again = Database.open(path, profile="test")
        try:
            assert again.schema_version() == migrations()[-1][0]
            assert again.get_session("s-1") == session_row()
        finally:
            again.close()


@pytest.mark.req("ORCH-DATA-0094")
def test_a_database_refuses_to_be_opened_by_another_profile(tmp_path: Path) -> None:
    path = tmp_path / "llorch-dev.sqlite3"
    Database.open(path, profile="dev").close()

    with pytest.raises(ProfileMismatch, match=r"'dev'.*'prod'"):
        Database.open(path, profile="prod")
    with pytest.raises(ProfileMismatch):
        Database.open(path, profile="test")
    Database.open(path, profile="dev").close()


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


@pytest.mark.req("ORCH-DATA-0095")
def test_an_extra_table_in_the_live_schema_is_refused(path: Path, db: Database) -> None:
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE intruder (x INTEGER)")

    with pytest.raises(SchemaMismatch, match="intruder"):
        Database.open(path, profile="test")


@pytest.mark.req("ORCH-DATA-0095")
def test_a_missing_index_in_the_live_schema_is_refused(path: Path, db: Database) -> None:
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP INDEX tasks_by_state")

    with pytest.raises(SchemaMismatch, match="tasks_by_state"):
        Database.open(path, profile="test")


@pytest.mark.req("ORCH-DATA-0095")
def test_a_changed_table_in_the_live_schema_is_refused(path: Path, db: Database) -> None:
    db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE tasks ADD COLUMN surprise TEXT")

    with pytest.raises(SchemaMismatch):
        Database.open(path, profile="test")


def test_sessions_are_inserted_read_and_soft_deleted(db: Database) -> None:
    db.insert_session(session_row(turns=3, last_pool_id="default", last_replica_id="default-0"))

    row = db.get_session("s-1")
    assert row == session_row(turns=3, last_pool_id="default", last_replica_id="default-0")
    assert db.get_session("s-unknown") is None

    assert db.delete_session("s-1") is True
    assert db.get_session("s-1") is None
    assert db.delete_session("s-1") is False


@pytest.mark.req("ORCH-DATA-0011")
def test_admit_task_writes_the_task_and_a_new_session_together(path: Path, db: Database) -> None:
    seq = db.admit_task(task_row("t-1", session_id="s-1"), session_row(), new_session=True)

    stored = db.get_task("t-1")
    assert stored == dataclasses.replace(task_row("t-1", session_id="s-1"), seq=seq)
    assert seq >= 1
    assert db.get_session("s-1") == session_row()


@pytest.mark.req("ORCH-DATA-0011", "ORCH-DATA-0072")
def test_admit_task_records_the_use_of_an_existing_session(db: Database) -> None:
    db.insert_session(session_row())

    db.admit_task(task_row("t-1"), session_row(turns=1, last_used_ms=5_000), new_session=False)

    row = db.get_session("s-1")
    assert row is not None
    assert (row.turns, row.last_used_ms) == (1, 5_000)


@pytest.mark.req("ORCH-DATA-0019")
def test_a_failed_admission_leaves_neither_task_nor_session(path: Path, db: Database) -> None:
    db.admit_task(task_row("t-1", session_id="s-1"), session_row("s-1"), new_session=True)

    # The task id is taken: the insert fails after the new session was written in the same
    # transaction, which must be rolled back.
    with pytest.raises(StorageError) as caught:
        db.admit_task(task_row("t-1", session_id="s-2"), session_row("s-2"), new_session=True)

    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    assert caught.value.code == "INTERNAL"
    assert db.get_session("s-2") is None
    assert count(path, "tasks") == 1


@pytest.mark.req("ORCH-DATA-0082")
def test_finish_task_writes_task_and_session_together_or_not_at_all(db: Database) -> None:
    db.admit_task(task_row("t-1"), session_row(), new_session=True)

    with pytest.raises(StorageError):
        db.finish_task("t-1", {"state": "succeeded"}, "s-1", {"no_such_column": 1})
    task = db.get_task("t-1")
    assert task is not None and task.state == "queued"

    db.finish_task(
        "t-1",
        {"state": "failed", "error_code": "WORKER_RESET", "error_retriable": True},
        "s-1",
        {"tokens_remaining": 900},
    )
    task = db.get_task("t-1")
    session = db.get_session("s-1")
    assert task is not None and session is not None
    assert (task.state, task.error_code, task.error_retriable) == ("failed", "WORKER_RESET", True)
    assert session.tokens_remaining == 900


def test_place_task_records_the_start_and_the_session_placement_together(
    path: Path, db: Database
) -> None:
    db.admit_task(task_row("t-1"), session_row(), new_session=True)

    db.place_task(
        "t-1", "s-1", pool_id="default", replica_id="default-1", state="running", started_ms=2_000
    )

    task, session = db.get_task("t-1"), db.get_session("s-1")
    assert task is not None and session is not None
    assert (task.state, task.started_ms, task.replica_id) == ("running", 2_000, "default-1")
    assert (session.last_pool_id, session.last_replica_id) == ("default", "default-1")
    assert session == session_row(last_pool_id="default", last_replica_id="default-1")

    # One transaction: with the database locked, neither row changes.
    db.close()
    impatient = Database.open(path, profile="test", busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageError):
            impatient.place_task(
                "t-1", "s-1", pool_id="p2", replica_id="p2-0", state="failed", started_ms=3_000
            )
        other.execute("ROLLBACK")
        task, session = impatient.get_task("t-1"), impatient.get_session("s-1")
        assert task is not None and session is not None
        assert (task.state, task.started_ms, session.last_pool_id) == ("running", 2_000, "default")
    finally:
        other.close()
        impatient.close()


@pytest.mark.req("ORCH-DATA-0041")
def test_list_tasks_is_newest_first_and_pages_with_before_seq(db: Database) -> None:
    db.insert_session(session_row("s-1"))
    db.insert_session(session_row("s-2"))
    seqs = {}
    for i in range(5):
        session_id = "s-1" if i % 2 == 0 else "s-2"
        seqs[f"t-{i}"] = db.admit_task(
            task_row(f"t-{i}", session_id=session_id), session_row(session_id), new_session=False
        )
    db.update_task("t-4", state="succeeded")

    first = db.list_tasks(session_id=None, state=None, limit=2, before_seq=None)
    assert [t.task_id for t in first] == ["t-4", "t-3"]
    second = db.list_tasks(session_id=None, state=None, limit=2, before_seq=first[-1].seq)
    assert [t.task_id for t in second] == ["t-2", "t-1"]
    third = db.list_tasks(session_id=None, state=None, limit=2, before_seq=second[-1].seq)
    assert [t.task_id for t in third] == ["t-0"]
    assert [t.seq for t in first + second + third] == sorted(seqs.values(), reverse=True)

    by_session = db.list_tasks(session_id="s-1", state=None, limit=10, before_seq=None)
    assert [t.task_id for t in by_session] == ["t-4", "t-2", "t-0"]
    by_state = db.list_tasks(session_id="s-1", state="queued", limit=10, before_seq=None)
    assert [t.task_id for t in by_state] == ["t-2", "t-0"]
    assert [t.task_id for t in db.tasks_in_states(["queued"])] == ["t-0", "t-1", "t-2", "t-3"]


@pytest.mark.req("ORCH-DATA-0019")
def test_a_locked_database_makes_writes_fail_with_a_storage_error(path: Path, db: Database) -> None:
    db.close()
    impatient = Database.open(path, profile="test", busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")

        with pytest.raises(StorageError) as caught:
            impatient.admit_task(task_row("t-1"), session_row(), new_session=True)
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        assert caught.value.retriable is True
        with pytest.raises(StorageError):
            impatient.insert_session(session_row("s-2"))
        with pytest.raises(StorageError):
            impatient.update_task("t-1", state="running")

        other.execute("ROLLBACK")
        # Nothing was half-written while the lock was held.
        assert impatient.get_task("t-1") is None
        assert impatient.get_session("s-1") is None
        assert impatient.get_session("s-2") is None
        # And the store works again once the lock is gone.
        impatient.admit_task(task_row("t-1"), session_row(), new_session=True)
        assert impatient.get_task("t-1") is not None
    finally:
        other.close()
        impatient.close()


def trace_row(task_id: str) -> ArtifactInsert:
    return ArtifactInsert(
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


def test_finish_task_stores_the_trace_row_in_the_same_transaction(db: Database) -> None:
    db.admit_task(task_row("t-1"), session_row(), new_session=True)
    trace = trace_row("t-1")

    with pytest.raises(StorageError):
        db.finish_task("t-1", {"state": "succeeded"}, "s-1", {"no_such_column": 1}, trace=trace)
    assert db.get_artifact(trace.artifact_id) is None

    db.finish_task(
        "t-1",
        {"state": "succeeded", "trace_artifact_id": trace.artifact_id},
        "s-1",
        {"tokens_remaining": 900},
        trace=trace,
    )
    task = db.get_task("t-1")
    stored = db.get_artifact(trace.artifact_id)
    assert task is not None and stored is not None
    assert task.trace_artifact_id == trace.artifact_id
    assert (stored["kind"], stored["task_id"], stored["size_bytes"]) == ("trace", "t-1", 2)
    assert db.insert_artifact(trace) is False  # stored once


@pytest.mark.req("ORCH-CTRL-0042")
def test_the_outcome_of_the_most_recent_write_is_recorded(db: Database) -> None:
    def failing() -> bool:  # calls, so that mypy does not narrow the attributes
        return db.write_failing

    assert not failing()
    db.admit_task(task_row("t-1"), session_row(), new_session=True)

    # The session's insert succeeds inside the transaction; the task's then fails: failing.
    with pytest.raises(StorageError):
        db.admit_task(task_row("t-1", session_id="s-2"), session_row("s-2"), new_session=True)
    assert failing()

    # A read, successful or not, leaves it as it is.
    assert db.get_task("t-1") is not None
    assert failing()

    db.update_task("t-1", state="running")
    assert not failing()


@pytest.mark.req("ORCH-SEC-0023")
def test_the_views_migration_keeps_every_existing_owners_metadata(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in migrations():
        if number <= 4:
            conn.executescript(script)
    conn.execute("PRAGMA user_version = 4")
    conn.execute(
        "INSERT INTO artifacts (artifact_id, digest, kind, size_bytes, created_ms, tags, "
        "metadata) VALUES ('sha256:ab', 'ab', 'prompt', 1, 7, '[\"t\"]', '{\"k\": \"v\"}')"
    )
    for owner in ("alice", "bob"):
        conn.execute("INSERT INTO artifact_owners VALUES ('sha256:ab', ?)", (owner,))
    conn.close()

    db = Database.open(path, profile="test")
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
        assert "artifact_owners" not in tables(path)
    finally:
        db.close()
