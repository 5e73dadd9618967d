"""A task's event stream: an append-only buffer that any number of subscribers read.

Events have contiguous sequence ids from 0. The buffer is bounded by construction: one
``started``, at most ``max_tokens_out`` tokens, one ``metrics`` per ``metrics_every_tokens``
tokens and one terminal event. A subscriber may attach at any time and starts from the beginning
or after a given id; it sees exactly the events published, in order, and nothing after the
terminal ``end`` or ``error``.

Each stream keeps :attr:`EventStream.approx_bytes`, an estimate of the memory its events hold,
added up as they are published (a few hundred nanoseconds an event, nothing serialised), so
that the registry can bound the streams it retains in bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

from llorch.timers import Watchdog

TERMINAL = frozenset({"end", "error"})

# Measured with tracemalloc on CPython 3.11 (a token event: ~366 bytes, a metrics event ~610):
# an Event, its slot in the list and allocator overhead; a dict and each of its keys; a value.
_EVENT_BYTES = 120
_DICT_BYTES = 64
_KEY_BYTES = 40
_VALUE_BYTES = 32
_STR_BYTES = 40


def approx_bytes(data: dict[str, Any]) -> int:
    """An estimate of the memory ``data`` holds (within ~2x, on the high side for literals)."""
    size = _DICT_BYTES + _KEY_BYTES * len(data)
    for value in data.values():
        if isinstance(value, str):
            size += _STR_BYTES + len(value)
        elif isinstance(value, dict):
            size += approx_bytes(value)
        elif isinstance(value, list):
            size += _DICT_BYTES + _VALUE_BYTES * len(value)
        else:
            size += _VALUE_BYTES
    return size


class Event(NamedTuple):
    """One published event. A named tuple: made at every token, it costs a quarter of a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field; bench/NOTES.md)."""

    seq: int
    kind: str
    data: dict[str, Any]


class StreamClosed(RuntimeError):
    """An event was published after the terminal event."""


class EventStream:
    def __init__(self, *, first_seq: int = 0) -> None:
        # A stream rebuilt after its earlier events left memory starts at their original ids.
        self._first_seq = first_seq
        self._events: list[Event] = []
        self.approx_bytes = 0  # see approx_bytes()
        # The futures of the subscribers waiting for the next event. Not an asyncio.Event: its
        # deque takes ~600 bytes, and a fresh one per publish cost every token an allocation.
        self._waiters: list[asyncio.Future[None]] = []
        # Called with every event published (cluster mode: the durable transcript's writer).
        self.tap: Callable[[Event], None] | None = None

    @classmethod
    def replayed(cls, frames: Iterable[tuple[int, str, dict[str, Any]]]) -> EventStream:
        """A closed stream of frames already checked to be contiguous and terminated (a trace's
        transcript), built at once: publishing them one by one costs ~3 µs a frame."""
        events = [Event(seq, kind, data) for seq, kind, data in frames]
        stream = cls(first_seq=events[0].seq)
        stream._events = events
        stream.approx_bytes = sum(_EVENT_BYTES + approx_bytes(e.data) for e in events)
        return stream

    @property
    def closed(self) -> bool:
        return bool(self._events) and self._events[-1].kind in TERMINAL

    @property
    def events(self) -> list[Event]:
        return self._events

    @property
    def next_seq(self) -> int:
        return self._first_seq + len(self._events)

    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        events = self._events
        if events and events[-1].kind in TERMINAL:
            raise StreamClosed(f"{kind} event after the terminal event")
        event = Event(self._first_seq + len(events), kind, data)
        events.append(event)
        self.approx_bytes += _EVENT_BYTES + approx_bytes(data)
        if self.tap is not None:
            self.tap(event)
        if self._waiters:
            self._wake()
        return event

    def _wake(self) -> None:
        """Wake every subscriber waiting in :meth:`_changed`, at once."""
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _changed(self) -> None:
        """Return after the next event is published."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:  # not woken: it leaves the list (a heartbeat, a cancel)
                self._waiters.remove(waiter)
            raise

    def _start_index(self, after: int | None) -> int:
        """The position in :attr:`events` of the first event after id ``after``."""
        return 0 if after is None else max(0, after + 1 - self._first_seq)

    async def subscribe(
        self, *, after: int | None = None, heartbeat_s: float | None = None
    ) -> AsyncIterator[Event | None]:
        """Yield events after ``after`` (all when None); yield None when idle for heartbeat_s."""
        async for batch in self.batches(after=after, heartbeat_s=heartbeat_s):
            if batch is None:
                yield None
                continue
            for event in batch:
                yield event

    async def batches(
        self, *, after: int | None = None, heartbeat_s: float | None = None
    ) -> AsyncIterator[list[Event] | None]:
        """Like :meth:`subscribe`, but every event already published comes at once, in one list.

        A reader that keeps up gets one event at a time; one that fell behind catches up in one
        step (one SSE write for all of them), however many there are.
        """
        index = self._start_index(after)
        dog = None if heartbeat_s is None else Watchdog()
        loop = asyncio.get_running_loop()
        try:
            while True:
                if index < len(self._events):
                    batch = self._events[index:]
                    index += len(batch)
                    yield batch
                    if batch[-1].kind in TERMINAL:
                        return
                    continue
                if self.closed:
                    return
                if dog is None:
                    await self._changed()
                    continue
                assert heartbeat_s is not None
                dog.move(loop.time() + heartbeat_s)
                try:
                    await dog.wait(self._changed())
                except TimeoutError:
                    dog.move(loop.time() + heartbeat_s)
                    yield None
        finally:
            if dog is not None:
                dog.close()
