"""The durable transcript's writer and reads, and the recorded cancel, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from llorch.persistence import pg_events
from llorch.persistence.pg_events import Transcript
from llorch.persistence.pg_notify import MAX_PAYLOAD_BYTES, Listener
from llorch.persistence.postgres import PostgresStorage
from tests.unit.helpers import task_row
from tests.unit.test_db import session_row


def _until(check: Callable[[], object], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.01)


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStorage]:
    opened = PostgresStorage.open(postgres_url, profile="test")
    yield opened
    opened.close()


@pytest.fixture
def transcript(postgres_url: str, store: PostgresStorage) -> Iterator[Transcript]:
    written = Transcript(postgres_url, retry_s=0.1, timeout_s=2)
    written.start()
    yield written
    written.close()


def _admit(store: PostgresStorage, task_id: str, state: str = "running", **values: object) -> None:
    store.admit_task(task_row(task_id), session_row(), new_session=store.get_session("s-1") is None)
    store.update_task(task_id, state=state, **values)


@pytest.mark.req("ORCH-STATE-0041")
def test_frames_are_written_in_batches_and_read_back_after_an_id(
    store: PostgresStorage, transcript: Transcript
) -> None:
    _admit(store, "t-1")
    _admit(store, "t-2")
    for seq in range(50):
        transcript.append("t-1", seq, "token", {"text": f"w{seq}", "i": seq}, False)
        transcript.append("t-2", seq, "token", {"text": "x"}, False)
    transcript.append("t-1", 50, "end", {"finish_reason": "length"}, True)
    _until(lambda: transcript.stats.frames == 101)

    read = transcript.read("t-1", 47)
    assert read.state == "running"
    assert read.frames == [
        (48, "token", {"text": "w48", "i": 48}),
        (49, "token", {"text": "w49", "i": 49}),
        (50, "end", {"finish_reason": "length"}),
    ]
    # A few flushes, never a transaction a frame; one NOTIFY a flush (both tasks fit in one).
    assert transcript.stats.flushes < 20
    assert transcript.stats.notifies == transcript.stats.flushes
    assert transcript.read("t-1", 50).frames == []
    assert transcript.read("nope", -1).state is None
    many = transcript.read_many({"t-1": 49, "t-2": 48, "nope": -1})
    assert many["t-1"].frames == [(50, "end", {"finish_reason": "length"})]
    assert [seq for seq, _, _ in many["t-2"].frames] == [49]
    assert many["nope"].state is None and many["nope"].frames == []
    assert transcript.read_many({}) == {}


@pytest.mark.req("ORCH-STATE-0062")
def test_a_flush_writes_one_row_a_task_and_a_retried_one_holds_no_frame_twice(
    store: PostgresStorage, transcript: Transcript, postgres_url: str
) -> None:
    _admit(store, "t-1")
    _admit(store, "t-2")
    unstarted = Transcript(postgres_url)  # its writer not started: each flush made here
    tokens = [("t-1" if i % 3 else "t-2", i, "token", {"i": i}, False) for i in range(30)]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        unstarted._pending.extend(tokens[:12])
        unstarted._flush(conn)
        # A flush whose commit went through though the writer saw it fail is tried again, its
        # frames in front of the ones queued since: the rows are written again, longer.
        unstarted._pending.extend(tokens)
        unstarted._flush(conn)
        rows = conn.execute("SELECT task_id, first_seq, last_seq FROM task_events").fetchall()
        unstarted._pending.append(("t-1", 30, "end", {}, True))
        unstarted._flush(conn)
    assert sorted(rows) == [("t-1", 1, 29), ("t-2", 0, 27)]
    assert unstarted.stats.rows == 5 and unstarted.stats.frames == 12 + 30 + 1
    every = [seq for seq, _, _ in transcript.read("t-1", -1).frames]
    assert every == [i for i in range(30) if i % 3] + [30]
    after_13 = [seq for seq, _, _ in transcript.read("t-1", 13).frames]
    assert after_13 == [i for i in range(14, 30) if i % 3] + [30]
    assert [seq for seq, _, _ in transcript.read_many({"t-2": 20})["t-2"].frames] == [21, 24, 27]


@pytest.mark.req("ORCH-STATE-0041")
async def test_every_flush_notifies_the_tasks_it_wrote(
    postgres_url: str, store: PostgresStorage, transcript: Transcript
) -> None:
    _admit(store, "t-1")
    heard: list[str] = []
    ears = Listener(postgres_url, retry_s=0.1)
    ears.listen(pg_events.EVENTS_CHANNEL, heard.append)
    ears.start(asyncio.get_running_loop())
    try:
        async with asyncio.timeout(10):
            while not ears.up:  # noqa: ASYNC110 (a condition of another thread)
                await asyncio.sleep(0.01)
            transcript.append("t-1", 0, "started", {}, True)
            while not heard:  # noqa: ASYNC110 (a condition of another thread)
                await asyncio.sleep(0.01)
    finally:
        await asyncio.to_thread(ears.close)
    assert heard == ["t-1"]


@pytest.mark.req("ORCH-STATE-0041")
def test_notify_payloads_stay_under_the_servers_limit() -> None:
    ids = [f"task-{i:06d}-{'x' * 30}" for i in range(1000)]
    payloads = pg_events._payloads(ids)
    assert all(len(p.encode()) <= MAX_PAYLOAD_BYTES for p in payloads)
    assert " ".join(payloads).split() == ids


@pytest.mark.req("ORCH-STATE-0041")
def test_the_frames_of_tasks_ended_past_the_retention_are_deleted(
    store: PostgresStorage, transcript: Transcript, postgres_url: str
) -> None:
    now_ms = int(time.time() * 1000)
    _admit(store, "old", state="succeeded", ended_ms=now_ms - pg_events.RETENTION_MS - 1000)
    _admit(store, "recent", state="succeeded", ended_ms=now_ms)
    _admit(store, "running")
    for task_id in ("old", "recent", "running"):
        transcript.append(task_id, 0, "started", {}, True)
    _until(lambda: transcript.stats.frames == 3)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        transcript._prune(conn)
    assert transcript.read("old", -1).frames == []
    assert len(transcript.read("recent", -1).frames) == 1
    assert len(transcript.read("running", -1).frames) == 1


@pytest.mark.req("ORCH-STATE-0041")
def test_frames_wait_while_the_database_refuses_them_and_are_written_after(
    store: PostgresStorage, transcript: Transcript, postgres_url: str
) -> None:
    _admit(store, "t-1")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE task_events RENAME TO task_events_away")
        transcript.append("t-1", 0, "started", {}, True)
        _until(lambda: transcript.stats.failures >= 1)
        conn.execute("ALTER TABLE task_events_away RENAME TO task_events")
    _until(lambda: transcript.stats.frames == 1)
    assert transcript.read("t-1", -1).frames == [(0, "started", {})]


@pytest.mark.req("ORCH-STATE-0043")
def test_a_cancel_is_recorded_only_on_a_queued_or_running_task(
    store: PostgresStorage, transcript: Transcript
) -> None:
    _admit(store, "running")
    _admit(store, "queued", state="queued")
    _admit(store, "done", state="succeeded")
    assert transcript.request_cancel("running", 5) is True
    assert transcript.request_cancel("queued", 6) is True
    assert transcript.request_cancel("done", 7) is False
    assert transcript.request_cancel("missing", 8) is False
    assert transcript.request_cancel("running", 9) is True  # idempotent: the first time is kept
    assert sorted(transcript.cancels_asked(["running", "queued", "done", "x"])) == [
        "queued",
        "running",
    ]
    assert transcript.cancels_asked([]) == []
