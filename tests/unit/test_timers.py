"""llorch.timers.Watchdog: a moving deadline with asyncio.timeout's cancellation semantics."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from llorch.timers import Watchdog


async def test_a_deadline_moved_later_does_not_fire_at_its_old_time() -> None:
    loop = asyncio.get_running_loop()
    dog = Watchdog()
    dog.move(loop.time() + 0.05)
    dog.move(loop.time() + 10)
    assert await dog.wait(asyncio.sleep(0.1, result="done")) == "done"
    dog.close()


async def test_the_deadline_ends_a_wait_with_timeout_error_and_its_reason() -> None:
    loop = asyncio.get_running_loop()
    dog = Watchdog()
    dog.move(loop.time() + 0.02, "the idle limit")
    with pytest.raises(TimeoutError, match="the idle limit"):
        await dog.wait(asyncio.sleep(10))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # its own cancel was taken back
    dog.close()


async def test_a_wait_after_the_deadline_passed_raises_at_once() -> None:
    loop = asyncio.get_running_loop()
    dog = Watchdog()
    dog.move(loop.time() - 1, "the total limit")
    pending = asyncio.sleep(10)
    with pytest.raises(TimeoutError, match="the total limit"):
        await dog.wait(pending)  # the coroutine is closed, never left unawaited
    dog.close()


async def test_moving_the_deadline_earlier_rearms_it() -> None:
    loop = asyncio.get_running_loop()
    dog = Watchdog()
    dog.move(loop.time() + 10)
    dog.move(loop.time() + 0.02)
    with pytest.raises(TimeoutError):
        await dog.wait(asyncio.sleep(10))
    dog.close()


async def test_a_cancellation_from_elsewhere_is_never_turned_into_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def victim() -> None:
        dog = Watchdog()
        dog.move(loop.time() + 10)
        entered.set()
        await dog.wait(asyncio.sleep(10))

    task = asyncio.ensure_future(victim())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nested_watchdogs_each_own_their_expiry() -> None:
    loop = asyncio.get_running_loop()
    outer, inner = Watchdog(), Watchdog()
    outer.move(loop.time() + 0.02, "outer")
    inner.move(loop.time() + 10, "inner")

    async def nested() -> None:
        await inner.wait(asyncio.sleep(10))

    # The outer deadline cancels inside the inner wait: the inner one lets it through.
    with pytest.raises(TimeoutError, match="outer"):
        await outer.wait(nested())
    outer.close()
    inner.close()


def test_a_deadline_already_past_moves_again_on_uvloop() -> None:
    # uvloop's call_at gives a plain Handle, without when(), for a time already past: the server
    # runs on uvloop, and a task whose deadline passed before its engine call met it.
    async def past_then_moved() -> None:
        loop = asyncio.get_running_loop()
        dog = Watchdog()
        dog.move(loop.time() - 1, "the deadline")
        dog.move(loop.time() - 0.5, "the deadline")
        with pytest.raises(TimeoutError, match="the deadline"):
            await dog.wait(asyncio.sleep(10))
        dog.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(past_then_moved())
