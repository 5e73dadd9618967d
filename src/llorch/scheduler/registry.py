"""Where the scheduler keeps its pools, its live tasks and the streams of recently ended tasks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from llorch.scheduler.events import EventStream
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.task import TaskRecord


class Registry:
    """Live tasks, and the event streams of the most recently ended ones.

    Ended streams are kept for late subscribers, at most ``streams_retained`` of them and at
    most ``streams_retained_bytes`` of their estimated memory (:attr:`EventStream.approx_bytes`),
    the oldest evicted first; a stream larger than the whole budget is not kept. An evicted
    stream is replayed from the task's trace artifact (``scheduler.replay``).
    """

    def __init__(
        self, pools: list[PoolRuntime], streams_retained: int, streams_retained_bytes: int
    ) -> None:
        self.pools = {p.id: p for p in pools}
        self.live: dict[str, TaskRecord] = {}
        self._ended: OrderedDict[str, EventStream] = OrderedDict()
        self._streams_retained = streams_retained
        self._streams_retained_bytes = streams_retained_bytes
        self.retained_bytes = 0
        # Called with every task this instance takes on (cluster mode: its frames are recorded).
        self.on_add: Callable[[TaskRecord], None] | None = None

    def add(self, record: TaskRecord) -> None:
        self.live[record.task_id] = record
        if self.on_add is not None:
            self.on_add(record)

    def retire(self, record: TaskRecord) -> None:
        """Forget a task that ended; keep its stream for late subscribers, oldest evicted first."""
        self.live.pop(record.task_id, None)
        if not self._streams_retained or record.events.approx_bytes > self._streams_retained_bytes:
            return  # a stream larger than the whole budget would only push the others out
        previous = self._ended.pop(record.task_id, None)
        if previous is not None:
            self.retained_bytes -= previous.approx_bytes
        self._ended[record.task_id] = record.events
        self.retained_bytes += record.events.approx_bytes
        while self._ended and (
            len(self._ended) > self._streams_retained
            or self.retained_bytes > self._streams_retained_bytes
        ):
            _, evicted = self._ended.popitem(last=False)
            self.retained_bytes -= evicted.approx_bytes

    @property
    def retained(self) -> int:
        """How many ended tasks' streams are in memory."""
        return len(self._ended)

    def stream(self, task_id: str) -> EventStream | None:
        record = self.live.get(task_id)
        if record is not None:
            return record.events
        return self._ended.get(task_id)
