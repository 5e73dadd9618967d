"""One bounded queue per pool: two priority bands, and inside each band a weighted round-robin
across *flows* (the API key by default; the session or a declared header where configured).

Dispatch order:
- ``interactive`` before ``batch``, except that while both wait, every ``batch_every``-th
  dispatch goes to batch (``queue.batch_min_share``; 0 keeps interactive strictly first), so a
  steady interactive stream cannot hold batch at zero.
- Inside a band, deficit round-robin with unit cost: the flows that have tasks queued form a ring
  in the order they became active; the flow at the head of the ring gets up to its weight in
  dispatches, then the ring turns. FIFO within a flow. A flow that empties leaves the ring and
  rejoins it at the tail when it queues again.

The order is deterministic, so a task's queue position is computed, not guessed:
:func:`band_position` counts the dispatches before a task from the ring's shape alone.

Policies when full:
- ``reject``: the newcomer is refused (ADMISSION_REJECT).
- ``drop-lru``: the newcomer is admitted and a queued task of the same or lower priority is
  dropped, lower priority first; inside the band, the oldest task of the heaviest flow (most
  tasks per unit of weight). When there is none (a batch newcomer facing only interactive
  tasks) the newcomer is refused (QUEUE_FULL_DROP_LRU).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, Literal, TypeVar

from llorch.errors import AdmissionReject, QueueFull, QueueFullDropLru

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")

T = TypeVar("T")

# (queued tasks, weight) of each active flow, in ring order; the head flow has ``left``
# dispatches left in the current round.
Shape = list[tuple[int, int]]


def band_position(shape: Shape, left: int, ring_index: int, k: int) -> int:
    """Dispatches inside a band before task ``k`` (0-based) of the flow at ``ring_index``."""
    weight = shape[ring_index][1]
    # The round (0: the current one) in which task k is served; the head flow has ``left``
    # dispatches in this round, every other flow its full weight.
    head_rounds = 0 if k < left else 1 + (k - left) // weight
    rounds = head_rounds if ring_index == 0 else k // weight
    ahead = k
    for j, (queued, w) in enumerate(shape):
        if j == ring_index:
            continue
        # Flows before ours in the ring are served in our round too; those after it are not.
        served = rounds + 1 if j < ring_index else rounds
        quota = (left + (served - 1) * w if served > 0 else 0) if j == 0 else served * w
        ahead += min(queued, quota)
    return ahead


def batch_every(share: float) -> int:
    """Every how many dispatches batch gets one while interactive waits: at least ``share``."""
    return 0 if share <= 0 else max(2, int(1 / share + 1e-9))


class FlowBand(Generic[T]):
    """One priority band: round-robin across flows, FIFO within a flow."""

    def __init__(self, weight_of: Callable[[str], int]) -> None:
        self._weight_of = weight_of
        self._flows: dict[str, deque[T]] = {}
        self._ring: deque[str] = deque()
        self._left = 0  # dispatches left to the head of the ring in this round
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def holds(self, item: T, flow: str) -> bool:
        lane = self._flows.get(flow)
        return lane is not None and item in lane

    def push(self, item: T, flow: str) -> None:
        lane = self._flows.get(flow)
        if lane is None:
            lane = self._flows[flow] = deque()
            self._ring.append(flow)
            if len(self._ring) == 1:
                self._left = self._weight_of(flow)
        lane.append(item)
        self._size += 1

    def push_front(self, item: T, flow: str) -> None:
        """``item`` back as the band's next dispatch (a task its engine refused): first in its
        flow, its flow at the head of the ring with that one dispatch left in its round (the
        one it was served); the round-robin goes on from there."""
        lane = self._flows.get(flow)
        if lane is None:
            lane = self._flows[flow] = deque()
        elif self._ring[0] == flow:
            self._left += 1
        else:
            self._ring.remove(flow)
        if not self._ring or self._ring[0] != flow:
            self._ring.appendleft(flow)
            self._left = 1
        lane.appendleft(item)
        self._size += 1

    def peek(self) -> T | None:
        return self._flows[self._ring[0]][0] if self._ring else None

    def pop(self) -> T | None:
        if not self._ring:
            return None
        flow = self._ring[0]
        item = self._flows[flow].popleft()
        self._size -= 1
        self._left -= 1
        if not self._flows[flow]:
            del self._flows[flow]
            self._ring.popleft()
            self._reset_left()
        elif self._left <= 0:
            self._ring.rotate(-1)
            self._reset_left()
        return item

    def remove(self, item: T, flow: str) -> bool:
        lane = self._flows.get(flow)
        if lane is None or item not in lane:
            return False
        lane.remove(item)
        self._size -= 1
        if not lane:
            del self._flows[flow]
            head = self._ring[0] == flow
            self._ring.remove(flow)
            if head:
                self._reset_left()
        return True

    def _reset_left(self) -> None:
        self._left = self._weight_of(self._ring[0]) if self._ring else 0

    def heaviest_oldest(self) -> T | None:
        """The oldest task of the flow with the most tasks per unit of weight."""
        if not self._ring:
            return None
        flow = max(self._ring, key=lambda f: len(self._flows[f]) / self._weight_of(f))
        return self._flows[flow][0]

    def shape(self) -> tuple[Shape, int, dict[str, int]]:
        """The ring's shape, the head's dispatches left, and each flow's index in the ring."""
        shape = [(len(self._flows[f]), self._weight_of(f)) for f in self._ring]
        return shape, self._left, {f: i for i, f in enumerate(self._ring)}

    def position(self, item: T, flow: str) -> int | None:
        lane = self._flows.get(flow)
        if lane is None or item not in lane:
            return None
        shape, left, index = self.shape()
        return band_position(shape, left, index[flow], lane.index(item))

    def position_if_pushed(self, flow: str, without: tuple[T, str] | None = None) -> int:
        """The position a task of ``flow`` would get, once ``without`` (item, flow) is removed."""
        shape, left, index = self.shape()
        order = list(self._ring)
        if without is not None and without[1] in index:
            at = index[without[1]]
            queued, weight = shape[at]
            if queued > 1:
                shape[at] = (queued - 1, weight)
            else:
                del shape[at], order[at]
                if at == 0:
                    left = shape[0][1] if shape else 0
        if flow in order:
            at = order.index(flow)
            return band_position(shape, left, at, shape[at][0])
        shape.append((0, self._weight_of(flow)))
        if len(shape) == 1:
            left = shape[0][1]
        return band_position(shape, left, len(shape) - 1, 0)

    def __iter__(self) -> Iterator[T]:
        shape, left, index = self.shape()
        keyed = [
            (band_position(shape, left, index[flow], k), item)
            for flow, lane in self._flows.items()
            for k, item in enumerate(lane)
        ]
        return iter(item for _, item in sorted(keyed, key=lambda pair: pair[0]))


class PoolQueue(Generic[T]):
    def __init__(
        self,
        capacity: int,
        policy: Literal["reject", "drop-lru"],
        *,
        flow_of: Callable[[T], str] = lambda _: "",
        weights: Mapping[str, int] | None = None,
        batch_min_share: float = 0.0,
    ) -> None:
        self.capacity = capacity
        self.policy = policy
        self._flow_of = flow_of
        known = dict(weights or {})
        self._bands: dict[Priority, FlowBand[T]] = {
            p: FlowBand(lambda flow: known.get(flow, 1)) for p in PRIORITIES
        }
        self._every = batch_every(batch_min_share)
        self._since_batch = 0  # interactive dispatches since the last batch one, batch waiting

    def __len__(self) -> int:
        return sum(len(band) for band in self._bands.values())

    def __iter__(self) -> Iterator[T]:
        """The queued tasks in dispatch order."""
        interactive, batch = self.depth("interactive"), self.depth("batch")
        ranked = [
            (self._overall(priority, k, interactive, batch), item)
            for priority in PRIORITIES
            for k, item in enumerate(self._bands[priority])
        ]
        return iter(item for _, item in sorted(ranked, key=lambda pair: pair[0]))

    def depth(self, priority: Priority) -> int:
        return len(self._bands[priority])

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
            victim = self._bands[lower].heaviest_oldest()
            if victim is not None:
                return victim
        raise QueueFullDropLru("queue is full of tasks of higher priority", policy_label="drop-lru")

    def push(self, item: T, priority: Priority) -> None:
        self._bands[priority].push(item, self._flow_of(item))

    def push_front(self, item: T, priority: Priority) -> None:
        """``item`` back as its band's next dispatch; never refused: it was admitted already,
        so the queue may hold more than ``capacity`` by the tasks sent back (ORCH-ENG-0015)."""
        self._bands[priority].push_front(item, self._flow_of(item))

    def _next_band(self) -> Priority | None:
        interactive, batch = self._bands["interactive"], self._bands["batch"]
        if not interactive:
            return "batch" if batch else None
        if batch and self._every and self._since_batch >= self._every - 1:
            return "batch"
        return "interactive"

    def pop(self) -> T | None:
        band = self._next_band()
        if band is None:
            return None
        if band == "batch":
            self._since_batch = 0
        elif self._bands["batch"]:
            self._since_batch += 1
        return self._bands[band].pop()

    def peek(self) -> T | None:
        band = self._next_band()
        return None if band is None else self._bands[band].peek()

    def remove(self, item: T, priority: Priority) -> bool:
        return self._bands[priority].remove(item, self._flow_of(item))

    def position(self, item: T, priority: Priority) -> int | None:
        """0-based position in dispatch order, or None when not queued."""
        in_band = self._bands[priority].position(item, self._flow_of(item))
        if in_band is None:
            return None
        return self._overall(priority, in_band, self.depth("interactive"), self.depth("batch"))

    def position_if_pushed(self, flow: str, priority: Priority, victim: T | None = None) -> int:
        """The position a new task of ``flow`` and ``priority`` would get, ``victim`` dropped."""
        depths = {p: self.depth(p) for p in PRIORITIES}
        without = None
        if victim is not None:
            flow_of_victim = self._flow_of(victim)
            victim_priority = next(
                p for p in PRIORITIES if self._bands[p].holds(victim, flow_of_victim)
            )
            depths[victim_priority] -= 1
            if victim_priority == priority:
                without = (victim, flow_of_victim)
        in_band = self._bands[priority].position_if_pushed(flow, without)
        return self._overall(priority, in_band, depths["interactive"], depths["batch"])

    def _overall(self, priority: Priority, in_band: int, interactive: int, batch: int) -> int:
        """A position inside a band → the position in the pool's dispatch order."""
        every = self._every
        if priority == "interactive":
            if not every:
                return in_band
            return in_band + min(batch, (self._since_batch + in_band) // (every - 1))
        if not every:
            return in_band + interactive
        return in_band + min(interactive, max(0, (in_band + 1) * (every - 1) - self._since_batch))


__all__ = ["PRIORITIES", "PoolQueue", "Priority", "QueueFull", "band_position", "batch_every"]
