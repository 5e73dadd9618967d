"""The LISTEN/NOTIFY listener against a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from llorch.persistence.pg_notify import Listener

pytestmark = pytest.mark.req("ORCH-STATE-0040")


async def _until(check: Callable[[], object], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 (a condition of another thread)
            await asyncio.sleep(0.01)


@pytest.fixture
async def listener(postgres_url: str) -> AsyncIterator[Listener]:
    """A listener not started yet: a test subscribes first, then calls ``_started``."""
    ears = Listener(postgres_url, retry_s=0.2)
    yield ears
    await asyncio.to_thread(ears.close)


async def _started(listener: Listener) -> list[int]:
    """Start ``listener``; return once it listens to every channel subscribed so far, with the
    list its on_connect callback appends to."""
    connects: list[int] = []
    listener.on_connect(lambda: connects.append(1))
    listener.start(asyncio.get_running_loop())
    await _until(lambda: listener.up and connects)
    return connects


async def test_notifications_reach_the_loop_in_order(listener: Listener, postgres_url: str) -> None:
    got: list[str] = []
    listener.listen("llorch_test", got.append)
    await _started(listener)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for i in range(5):
            conn.execute("SELECT pg_notify('llorch_test', %s)", (str(i),))
    await _until(lambda: len(got) == 5)
    assert got == ["0", "1", "2", "3", "4"]


async def test_notify_is_sent_from_the_listener_thread(listener: Listener) -> None:
    got: list[str] = []
    other: list[str] = []
    listener.listen("llorch_a", got.append)
    listener.listen("llorch_b", other.append)
    await _started(listener)
    listener.notify("llorch_a", "hello")
    await _until(lambda: got == ["hello"])
    assert other == []


async def test_a_channel_subscribed_after_the_start_is_listened_to(listener: Listener) -> None:
    await _started(listener)
    got: list[str] = []
    listener.listen("llorch_late", got.append)
    # Sent through the listener's own connection, after its LISTEN: the thread runs them in order.
    listener.notify("llorch_late", "x")
    await _until(lambda: got == ["x"])


async def test_reconnects_and_asks_subscribers_to_catch_up(
    listener: Listener, postgres_url: str
) -> None:
    got: list[str] = []
    listener.listen("llorch_test", got.append)
    connects = await _started(listener)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # The server drops the listener's connection (as in an outage).
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await _until(lambda: len(connects) >= 2 and listener.up)
        conn.execute("SELECT pg_notify('llorch_test', 'after')")
    await _until(lambda: "after" in got)


async def test_a_failing_callback_does_not_silence_the_others(listener: Listener) -> None:
    got: list[str] = []

    def broken(payload: str) -> None:
        raise RuntimeError(payload)

    listener.listen("llorch_test", broken)
    listener.listen("llorch_test", got.append)
    await _started(listener)
    listener.notify("llorch_test", "x")
    await _until(lambda: got == ["x"])


def test_channel_names_and_payload_size_are_checked(postgres_url: str) -> None:
    ears = Listener(postgres_url)
    with pytest.raises(ValueError):
        ears.listen("Robert'); DROP TABLE tasks", lambda _: None)
    with pytest.raises(ValueError):
        ears.notify("llorch_test", "x" * 8000)
    ears.close()
