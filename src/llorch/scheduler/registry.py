"""Where the scheduler keeps its pools, its live tasks and the streams of recently ended tasks."""

from __future__ import annotations

from collections import OrderedDict

from llorch.scheduler.events import EventStream
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.task import TaskRecord


class Registry:
    def __init__(self, pools: list[PoolRuntime], streams_retained: int) -> None:
        self.pools = {p.id: p for p in pools}
        self.live: dict[str, TaskRecord] = {}
        self._ended: OrderedDict[str, EventStream] = OrderedDict()
        self._streams_retained = streams_retained

    def add(self, record: TaskRecord) -> None:
        self.live[record.task_id] = record

    def retire(self, record: TaskRecord) -> None:
        """Forget a task that ended; keep its stream for late subscribers, oldest evicted first."""
        self.live.pop(record.task_id, None)
        if self._streams_retained:
            self._ended[record.task_id] = record.events
            while len(self._ended) > self._streams_retained:
                self._ended.popitem(last=False)

    def stream(self, task_id: str) -> EventStream | None:
        record = self.live.get(task_id)
        if record is not None:
            return record.events
        return self._ended.get(task_id)
