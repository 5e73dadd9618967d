"""llorch.api.http.SlimEvent behaves as asyncio.Event (it keeps asyncio's code, not its deque)."""

from __future__ import annotations

import asyncio

from llorch.api.http import SlimEvent


async def test_a_slim_event_sets_clears_wakes_every_waiter_and_forgets_cancelled_ones() -> None:
    event = SlimEvent()
    assert not event.is_set()
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    gone = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert len(event._waiters) == 3
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert event.is_set()
    assert await event.wait()
    assert not event._waiters
    event.clear()
    assert not event.is_set()
    assert SlimEvent(is_set=True).is_set()
    kept: object = event._waiters
    assert isinstance(kept, list)
