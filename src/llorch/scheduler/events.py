"""A task's event stream: an append-only buffer that any number of subscribers read.

Events have contiguous sequence ids from 0. The buffer is bounded by construction: one
``started``, at most ``max_tokens_out`` tokens, one ``metrics`` per ``metrics_every_tokens``
tokens and one terminal event. A subscriber may attach at any time and starts from the beginning
or after a given id; it sees exactly the events published, in order, and nothing after the
terminal ``end`` or ``error``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

TERMINAL = frozenset({"end", "error"})


@dataclass(frozen=True, slots=True)
class Event:
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
        self._changed = asyncio.Event()

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
        if self.closed:
            raise StreamClosed(f"{kind} event after the terminal event")
        event = Event(self._first_seq + len(self._events), kind, data)
        self._events.append(event)
        # Wake every waiting subscriber at once; later waiters get a fresh asyncio.Event.
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    async def wait_for_seq(self, seq: int) -> None:
        """Return once the event with id ``seq`` is published, or the stream is closed."""
        while self.next_seq <= seq and not self.closed:
            await self._changed.wait()

    async def subscribe(
        self, *, after: int | None = None, heartbeat_s: float | None = None
    ) -> AsyncIterator[Event | None]:
        """Yield events after ``after`` (all when None); yield None when idle for heartbeat_s."""
        index = 0 if after is None else max(0, after + 1 - self._first_seq)
        while True:
            while index < len(self._events):
                event = self._events[index]
                index += 1
                yield event
                if event.kind in TERMINAL:
                    return
            if self.closed:
                return
            changed = self._changed
            try:
                async with asyncio.timeout(heartbeat_s):
                    await changed.wait()
            except TimeoutError:
                yield None
