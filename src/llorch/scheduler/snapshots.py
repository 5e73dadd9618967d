"""What the scheduler shows the edge: frozen snapshots of tasks and pools.

The scheduler never builds a wire shape; ``api/views.py`` turns these into the bodies the
contracts declare.
"""

from __future__ import annotations

from dataclasses import dataclass

from llorch.persistence import TaskRow
from llorch.scheduler.events import EventStream
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.registry import Registry
from llorch.scheduler.task import QUEUED


@dataclass(frozen=True)
class TaskSnapshot:
    """A task's row with what only the live scheduler knows: its current state (the row lags
    behind a running task) and its place in the queue (None unless queued)."""

    row: TaskRow
    state: str
    queue_position: int | None


@dataclass(frozen=True)
class TaskPage:
    items: tuple[TaskSnapshot, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class TaskStream:
    """An opened stream: the task's row (read once) and its events, live or replayed."""

    row: TaskRow
    events: EventStream


@dataclass(frozen=True)
class ReplicaSnapshot:
    id: str
    state: str
    slots_total: int
    slots_busy: int
    last_error: str | None


@dataclass(frozen=True)
class PoolSnapshot:
    """A pool as its health and its capabilities show it."""

    pool_id: str
    engine: str
    engine_version: str
    model: str
    ctx_max: int
    max_tokens_out: int
    ready: bool
    draining: bool
    reloading: bool
    last_reload_error: str | None
    replicas: tuple[ReplicaSnapshot, ...]
    slots_free: int
    queue_depth: int
    queue_capacity: int
    queue_policy: str
    features: tuple[str, ...] = ()  # what its engine serves beyond text (ORCH-ENG-0008)

    @property
    def slots_total(self) -> int:
        return sum(r.slots_total for r in self.replicas)


def task_snapshot(registry: Registry, row: TaskRow) -> TaskSnapshot:
    record = registry.live.get(row.task_id)
    state = record.state if record is not None else row.state
    position = None
    if record is not None and state == QUEUED:
        position = registry.pools[row.pool_id].queue.position(record, record.priority)
    return TaskSnapshot(row=row, state=state, queue_position=position)


def pool_snapshot(pool: PoolRuntime) -> PoolSnapshot:
    engine = pool.replicas[0].engine if pool.replicas else None
    return PoolSnapshot(
        pool_id=pool.id,
        engine=engine.engine if engine else pool.settings.engine,
        engine_version=engine.version if engine else "",
        model=pool.model,
        ctx_max=_ctx_max(pool),
        max_tokens_out=pool.settings.max_tokens_out,
        ready=pool.ready,
        draining=pool.draining,
        reloading=pool.reloading,
        last_reload_error=pool.last_reload_error,
        replicas=tuple(
            ReplicaSnapshot(
                id=r.id,
                state=r.state,
                slots_total=r.engine.slots,
                slots_busy=r.busy,
                last_error=r.last_error,
            )
            for r in pool.replicas
        ),
        slots_free=sum(r.free for r in pool.replicas),
        queue_depth=len(pool.queue),
        queue_capacity=pool.settings.queue.capacity,
        queue_policy=pool.settings.queue.policy,
        features=tuple(sorted(pool.features)),
    )


def _ctx_max(pool: PoolRuntime) -> int:
    """The configured limit, lowered to what the engines report per slot."""
    reported = [r.engine.context_size for r in pool.replicas]
    return min([pool.settings.max_context, *(c for c in reported if c)])
