"""One bounded queue per pool with two priority lanes: interactive before batch, FIFO within.

Policies when full:
- ``reject``: the newcomer is refused (ADMISSION_REJECT).
- ``drop-lru``: the newcomer is admitted and the oldest queued task of the same or lower priority
  is dropped, lower priority first; when there is none (a batch newcomer facing only interactive
  tasks) the newcomer is refused (QUEUE_FULL_DROP_LRU).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Literal, TypeVar

from llorch.errors import AdmissionReject, QueueFull, QueueFullDropLru

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")

T = TypeVar("T")


class PoolQueue(Generic[T]):
    def __init__(self, capacity: int, policy: Literal["reject", "drop-lru"]) -> None:
        self.capacity = capacity
        self.policy = policy
        self._lanes: dict[Priority, deque[T]] = {p: deque() for p in PRIORITIES}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def __iter__(self) -> Iterator[T]:
        for priority in PRIORITIES:
            yield from self._lanes[priority]

    def depth(self, priority: Priority) -> int:
        return len(self._lanes[priority])

    def victim_for(self, priority: Priority) -> T | None:
        """Check that one more task of ``priority`` fits; return the task it would displace.

        Raises a :class:`QueueFull` subclass (without retry advice) when it cannot be admitted.
        Nothing changes until :meth:`push` and :meth:`remove` are called.
        """
        if len(self) < self.capacity:
            return None
        if self.policy == "reject":
            raise AdmissionReject("queue is full", policy_label="reject")
        rank = PRIORITIES.index(priority)
        for lower in reversed(PRIORITIES[rank:]):
            if self._lanes[lower]:
                return self._lanes[lower][0]
        raise QueueFullDropLru("queue is full of tasks of higher priority", policy_label="drop-lru")

    def push(self, item: T, priority: Priority) -> None:
        self._lanes[priority].append(item)

    def pop(self) -> T | None:
        for priority in PRIORITIES:
            if self._lanes[priority]:
                return self._lanes[priority].popleft()
        return None

    def peek(self) -> T | None:
        for priority in PRIORITIES:
            if self._lanes[priority]:
                return self._lanes[priority][0]
        return None

    def remove(self, item: T, priority: Priority) -> bool:
        try:
            self._lanes[priority].remove(item)
        except ValueError:
            return False
        return True

    def position(self, item: T, priority: Priority) -> int | None:
        """0-based position in dispatch order, or None when not queued."""
        ahead = 0
        for p in PRIORITIES:
            if p == priority:
                try:
                    return ahead + self._lanes[p].index(item)
                except ValueError:
                    return None
            ahead += len(self._lanes[p])
        return None


__all__ = ["PRIORITIES", "PoolQueue", "Priority", "QueueFull"]
