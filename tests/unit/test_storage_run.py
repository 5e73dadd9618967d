"""Storage.run: where a storage call runs (ORCH-STATE-0060). SQLite: inline, on the loop's
thread. PostgreSQL: in a worker thread, the loop serving other work until the call returns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llorch.persistence import Database
from llorch.persistence.postgres import OFFLOAD_THREADS, POOL_MAX_SIZE, PostgresStorage
from tests.unit.helpers import task_row
from tests.unit.test_db import session_row


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStorage]:
    opened = PostgresStorage.open(postgres_url, profile="test")
    yield opened
    opened.close()


@pytest.mark.req("ORCH-STATE-0060")
async def test_sqlite_calls_inline_on_the_loops_thread(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "llorch.db", profile="test")
    try:
        assert db.offloads is False
        assert await db.run(threading.get_ident) == threading.get_ident()
        await db.run(db.admit_task, task_row("t-1"), session_row(), new_session=True)
        assert (await db.run(db.get_task, "t-1")) is not None
    finally:
        db.close()


@pytest.mark.req("ORCH-STATE-0060")
async def test_postgresql_calls_in_a_worker_thread_while_the_loop_serves(
    store: PostgresStorage,
) -> None:
    assert store.offloads is True
    assert POOL_MAX_SIZE > OFFLOAD_THREADS  # a connection per thread, and the heartbeat's
    loop_served = threading.Event()

    def waits_for_the_loop() -> str:
        # Returns only once the loop has run a callback meanwhile: inline, it would never.
        assert loop_served.wait(timeout=10), "the loop did not run while the call waited"
        return threading.current_thread().name

    call = asyncio.ensure_future(store.run(waits_for_the_loop))
    await asyncio.sleep(0)  # the call is under way in its thread
    asyncio.get_running_loop().call_soon(loop_served.set)
    assert (await call).startswith("llorch-pg")
    await store.run(store.admit_task, task_row("t-1"), session_row(), new_session=True)
    row = await store.run(store.get_task, "t-1")
    assert row is not None and row.task_id == "t-1"


@pytest.mark.req("ORCH-STATE-0060")
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4])
async def test_a_cancel_that_meets_a_call_ending_is_not_swallowed(
    store: PostgresStorage, monkeypatch: pytest.MonkeyPatch, steps: int
) -> None:
    # The call's future is the test's: it ends, and the caller is cancelled ``steps`` loop
    # iterations later, before the caller has taken the result. Python 3.11's wait_for
    # returned the result then, and the cancel was lost (a dispatcher loop never stopped).
    loop = asyncio.get_running_loop()
    ends: asyncio.Future[int] = loop.create_future()
    monkeypatch.setattr(loop, "run_in_executor", lambda *_: ends)
    caller = asyncio.ensure_future(store.run(int))
    await asyncio.sleep(0)  # the caller waits on the call
    ends.set_result(1)
    for _ in range(steps):
        await asyncio.sleep(0)
    if caller.done():  # it took the result before the cancel: nothing to lose
        assert caller.result() == 1
        return
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
