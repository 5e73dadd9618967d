"""A deadline that moves at every step without a timer operation per move.

``asyncio.timeout()`` arms a ``TimerHandle`` when it is entered and cancels it when it is left,
and ``Timeout.reschedule()`` does both; entering and leaving the context costs about 2 µs more.
Relaying tens of thousands of tokens a second under per-chunk idle limits, that was a fifth of the
relay's CPU (docs/benchmarks.md). A :class:`Watchdog` keeps one handle, armed no later than the
deadline: moving the deadline later is a float store, and a handle that fires early re-arms at
the current deadline. When the deadline has really passed during a wait, the handle cancels the
waiting task and the wait turns that cancellation into ``TimeoutError`` with asyncio.timeout's
own bookkeeping (``Task.cancelling`` / ``uncancel``): a cancellation from anyone else is never
swallowed.

Waits never span a ``yield``: a generator may hold a watchdog and wait under it between the
values it yields, and nothing is cancelled while its consumer runs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class Watchdog:
    """Usage::

    dog = Watchdog()
    dog.move(loop.time() + 5.0, "the first-token limit")
    while True:
        chunk = await dog.wait(anext(chunks))  # TimeoutError once the deadline has passed
        dog.move(loop.time() + 1.0, "the idle limit")
    ...
    dog.close()
    """

    # Every open stream has two (its engine call's, its heartbeat's).
    __slots__ = (
        "_armed_at",
        "_at",
        "_cancelled_at",
        "_handle",
        "_loop",
        "_task",
        "_waiting",
        "reason",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._at = math.inf
        # uvloop's call_at returns a plain Handle (no when()) for a time already past, so the
        # time the handle is armed for is kept here.
        self._handle: asyncio.Handle | None = None
        self._armed_at = math.inf
        # A watchdog belongs to the task that made it (asyncio.current_task is Python code in
        # 3.11, and this is per token); _waiting says that task is inside wait().
        self._task = asyncio.current_task()
        self._waiting = False
        self._cancelled_at: int | None = None  # its cancelling() count before we cancelled it
        #: What the current deadline is, for the message of the error a caller raises.
        self.reason = ""

    def move(self, at: float, reason: str = "") -> None:
        """Set the deadline (a ``loop.time()`` reading), earlier or later than before."""
        self._at = at
        self.reason = reason
        handle = self._handle
        if handle is None or at < self._armed_at:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(at, self._fire)
            self._armed_at = at

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``; raise ``TimeoutError`` if the deadline passes first (or had)."""
        if self._loop.time() >= self._at:
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()  # a coroutine never awaited would warn
            raise TimeoutError(self.reason)
        task = self._task
        assert task is not None, "a Watchdog is made and used inside a task"
        self._waiting = True
        try:
            return await awaitable
        except asyncio.CancelledError:
            before, self._cancelled_at = self._cancelled_at, None
            if before is not None and task.uncancel() <= before:
                raise TimeoutError(self.reason) from None
            raise
        finally:
            self._waiting = False

    def close(self) -> None:
        """Release the timer; the watchdog is not used again."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time()
        if self._at > now:
            self._handle = self._loop.call_at(self._at, self._fire)
            self._armed_at = self._at
        elif self._waiting and self._task is not None and self._cancelled_at is None:
            self._cancelled_at = self._task.cancelling()
            self._task.cancel()
        # Otherwise nothing waits: the next wait sees that the deadline has passed.
