"""A 202 and a terminal frame follow an fsync of SQLite's write-ahead log (ORCH-STATE-0020)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from llorch.errors import StorageError
from llorch.persistence import Database
from llorch.persistence.group_sync import GroupSync
from llorch.scheduler.events import Event, EventStream
from tests.conftest import SettingsFactory
from tests.support import in_process, pool, sql_connection

Journal = list[str]


def journal_wal_fsyncs(monkeypatch: pytest.MonkeyPatch, journal: Journal) -> None:
    """Note every fsync of a ``-wal`` file, when it returns."""
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("-wal"):
            journal.append("wal fsynced")

    monkeypatch.setattr(os, "fsync", fsync)


def journal_commits(conn: sqlite3.Connection, journal: Journal) -> None:
    def trace(statement: str) -> None:
        if statement.startswith(("INSERT INTO tasks", "UPDATE tasks SET state")):
            journal.append(statement.split("(")[0].split(" SET")[0].strip())
        elif statement == "COMMIT":
            journal.append("COMMIT")

    conn.set_trace_callback(trace)


def fsynced_between(journal: Journal, after: str, before: str) -> bool:
    """Whether the log was fsynced after the COMMIT that follows ``after``, before ``before``."""
    start = journal.index("COMMIT", journal.index(after))
    end = journal.index(before, start)
    return "wal fsynced" in journal[start:end]


@pytest.mark.req("ORCH-STATE-0020")
async def test_a_202_and_a_terminal_frame_follow_an_fsync_of_the_log(
    settings_for: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal: Journal = []
    publish = EventStream.publish

    def journal_publish(self: EventStream, kind: str, data: dict[str, Any]) -> Event:
        if kind in ("end", "error"):
            journal.append(f"published {kind}")
        return publish(self, kind, data)

    async with in_process(settings_for({"pools": [pool()]})) as api:
        journal_wal_fsyncs(monkeypatch, journal)
        journal_commits(sql_connection(api), journal)
        monkeypatch.setattr(EventStream, "publish", journal_publish)
        answer = await api.submit(max_tokens=3)
        journal.append("answered 202")
        assert answer.status_code == 202
        events = await api.events(answer.json()["task_id"])
        assert events[-1].event == "end"

    assert fsynced_between(journal, "INSERT INTO tasks", "answered 202")
    # The end's commit (the last UPDATE of its row) is fsynced before its frame is published.
    ended = len(journal) - 1 - journal[::-1].index("UPDATE tasks")
    assert fsynced_between(journal[ended:], "UPDATE tasks", "published end")


class Gate:
    """os.fsync, journaled, the first call held until :meth:`open`."""

    def __init__(self, journal: Journal) -> None:
        self._real, self._journal = os.fsync, journal
        self.entered, self._open = threading.Event(), threading.Event()

    def fsync(self, fd: int) -> None:
        self._journal.append("fsync began")
        if not self.entered.is_set():
            self.entered.set()
            self._open.wait(10)
        self._real(fd)

    def open(self) -> None:
        self._open.set()


@pytest.mark.req("ORCH-STATE-0020")
async def test_a_commit_made_during_an_fsync_waits_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database.open(tmp_path / "llorch.db", profile="test")
    sync = db._sync
    assert isinstance(sync, GroupSync)
    journal: Journal = []
    try:
        gate = Gate(journal)
        monkeypatch.setattr(os, "fsync", gate.fsync)
        db.delete_session("a")  # a write: a commit not durable yet
        first = asyncio.ensure_future(db.durable())
        assert await asyncio.to_thread(gate.entered.wait, 10)
        db.delete_session("b")  # committed while the first fsync is under way
        journal.append("second commit")
        second = asyncio.ensure_future(db.durable())
        gate.open()
        await first
        await second
        assert not db.needs_sync
    finally:
        db.close()
    # The second caller did not settle for the fsync that began before its commit.
    assert journal.count("fsync began") == 2
    assert journal.index("second commit") < len(journal) - 1 - journal[::-1].index("fsync began")


@pytest.mark.req("ORCH-STATE-0020")
async def test_callers_waiting_together_share_one_fsync(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "llorch.db", profile="test")
    sync = db._sync
    assert isinstance(sync, GroupSync)
    try:
        before = sync.fsyncs
        for i in range(20):
            db.delete_session(f"s{i}")
        await asyncio.gather(*(db.durable() for _ in range(20)))
        assert sync.fsyncs - before == 1
        await db.durable()  # nothing committed since: no fsync at all
        assert sync.fsyncs - before == 1
    finally:
        db.close()


@pytest.mark.req("ORCH-STATE-0020")
async def test_an_end_waits_while_the_log_cannot_be_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database.open(tmp_path / "llorch.db", profile="test")
    real, failures = os.fsync, [OSError(5, "Input/output error")] * 2

    def failing(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    published: list[str] = []
    done = asyncio.Event()

    def publish() -> None:
        published.append("end")
        done.set()

    try:
        db.delete_session("a")
        db.when_durable(publish)
        assert published == []
        with pytest.raises(StorageError, match="cannot sync the write-ahead log"):
            await db.durable()
        # Tried again with backoff by itself, and called once, when the fsync succeeds.
        await asyncio.wait_for(done.wait(), 10)
        assert published == ["end"] and not failures
        await db.durable()
        assert published == ["end"]
    finally:
        db.close()
