"""The scheduler's face to the edge: admit, read, list, cancel and subscribe to tasks."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llorch.artifacts import ArtifactStore
from llorch.clock import Clock
from llorch.config import PoolSettings, Settings
from llorch.contracts import metrics_contract
from llorch.engines import build_engines
from llorch.engines.base import Engine
from llorch.errors import BudgetExhausted, LlorchError, ShuttingDown, StorageBusy, TaskNotFound
from llorch.metrics import Metrics
from llorch.persistence import Storage, TaskRow, when_free
from llorch.scheduler.admission import Admission, Admitter
from llorch.scheduler.caller import ANYONE, Caller
from llorch.scheduler.control import PoolOperations
from llorch.scheduler.dispatcher import Dispatcher
from llorch.scheduler.events import EventStream
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.registry import Registry
from llorch.scheduler.remote_stream import Fanout
from llorch.scheduler.replay import replay_from_trace
from llorch.scheduler.settle import Settlement, replay_from_row
from llorch.scheduler.snapshots import (
    PoolSnapshot,
    TaskPage,
    TaskSnapshot,
    TaskStream,
    pool_snapshot,
    task_snapshot,
)
from llorch.scheduler.task import CANCELED, QUEUED, RUNNING
from llorch.sessions import SessionService
from llorch.sessions.service import Remaining

if TYPE_CHECKING:
    from llorch.persistence.pg_events import ClusterLinks

log = logging.getLogger("llorch.scheduler")

EngineFactory = Callable[[PoolSettings, int], list[Engine]]


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        db: Storage,
        sessions: SessionService,
        clock: Clock,
        engines: EngineFactory = build_engines,
        artifacts: ArtifactStore | None = None,
        metrics: Metrics | None = None,
        links: ClusterLinks | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._clock = clock
        self._artifacts = artifacts
        self.sessions = sessions
        self.metrics = metrics or Metrics(metrics_contract())
        self.registry = Registry(
            [PoolRuntime(p, engines(p, 0), self.metrics, clock) for p in settings.pools],
            settings.server.streams_retained,
            settings.server.streams_retained_bytes,
        )
        self._settlement = Settlement(self.registry, db, sessions, settings, clock, artifacts)
        self._dispatcher = Dispatcher(
            self.registry, db, sessions, settings, clock, self._settlement
        )
        self._admitter = Admitter(self.registry, db, sessions, settings, clock, self._settlement)
        self.pools = PoolOperations(self.registry, self._dispatcher, self.cancel, engines)
        self.closing = False
        self._fanout = self._join(links) if links is not None else None

    def _join(self, links: ClusterLinks) -> Fanout:
        """Cluster mode: this instance's streams are recorded, and other instances' tasks
        are streamed and cancelled through the database (scheduler.remote_stream)."""
        fanout = Fanout(links, self._db, self._clock, self._artifacts)
        fanout.cancel_held = self._cancel_held
        fanout.held = lambda: list(self.registry.live)
        self.registry.on_add = fanout.record
        return fanout

    async def start(self) -> None:
        await self._reconcile()
        if self._fanout is not None:
            await self._fanout.catch_up_cancels()  # asked of restored tasks while it was down
        await self._dispatcher.start()

    async def quiesce(self) -> None:
        """Stop admitting (SHUTTING_DOWN), give running tasks the grace period, cancel the rest."""
        self.closing = True
        await self._dispatcher.quiesce(self._settings.server.shutdown_grace_s)

    async def stop(self) -> None:
        self.closing = True
        await self._dispatcher.stop(self._settings.server.shutdown_grace_s)
        await self._settlement.stop()
        if self._fanout is not None:
            await self._fanout.close()
        for pool in self.registry.pools.values():
            for replica in pool.replicas:
                await replica.engine.close()

    async def _reconcile(self) -> None:
        """After a restart: queued tasks are queued again; tasks that were running end with a
        retriable WORKER_RESET (their engine call is gone). Nothing accepted is left open."""
        for row in self._db.tasks_in_states([RUNNING, QUEUED]):
            try:
                if row.state == QUEUED and self._admitter.restore(row):
                    continue
                await when_free(self._db, functools.partial(self._settlement.reconcile, row))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                await when_free(self._db, functools.partial(self._settlement.quarantine, row, exc))

    # -- operations -------------------------------------------------------------------------

    def admit(
        self, body: Mapping[str, Any], correlation_id: str, caller: Caller = ANYONE
    ) -> Admission:
        """Admit a task now; StorageBusy (uncounted) when the write lock is held elsewhere."""
        if self.closing:
            self.metrics.inc("llorch_tasks_rejected_total", code="SHUTTING_DOWN")
            raise ShuttingDown("the server is shutting down", retry_after_ms=1000)
        try:
            return self._admitter.admit(body, correlation_id, caller)
        except StorageBusy:
            raise  # not refused yet: admit_when_free tries again
        except LlorchError as exc:
            self._count_rejection(exc)
            raise

    async def admit_when_free(
        self, body: Mapping[str, Any], correlation_id: str, caller: Caller = ANYONE
    ) -> Admission:
        """:meth:`admit`, tried again while the database's write lock is held elsewhere (an
        admission writes nothing before its one transaction), the event loop free meanwhile."""
        try:
            return await when_free(self._db, lambda: self.admit(body, correlation_id, caller))
        except StorageBusy as exc:
            self._count_rejection(exc)
            raise

    def _count_rejection(self, exc: LlorchError) -> None:
        self.metrics.inc("llorch_tasks_rejected_total", code=exc.code)
        if isinstance(exc, BudgetExhausted) and exc.policy_label:
            self.metrics.inc("llorch_budget_rejections_total", policy_label=exc.policy_label)

    def cancel(self, task_id: str) -> None:
        """Cancel a task; idempotent, and a no-op for a task that already ended."""
        record = self.registry.live.get(task_id)
        if record is None:
            row = self._db.get_task(task_id)
            if row is None:
                raise TaskNotFound(f"task {task_id} not found")
            if self._fanout is not None and row.state in (QUEUED, RUNNING):
                self._fanout.request_cancel_soon(task_id)  # another instance holds it
            return
        phase = record.phase
        if record.cancel_requested or phase == "ending":
            return
        record.cancel_requested = True
        if phase == "queued":
            pool = self.registry.pools[record.pool_id]
            pool.queue.remove(record, record.priority)
            pool.record_queue()
            self._settlement.end_now(record, CANCELED, finish_reason="canceled")
        elif (phase == "running" or record.calling) and record.runner is not None:
            # The flag is set before this returns, so no token frame follows the cancel. A run
            # that began (waiting for its engine to accept it) ends the task when cancelled.
            record.runner.cancel()
        # "dispatched", its run not begun: the run sees the flag first and ends it canceled.

    async def cancel_durably(self, task_id: str) -> None:
        """:meth:`cancel`, returning once the cancel is durable: here, once the task's end is;
        for a task another instance holds, once the cancel is recorded and notified to it
        (ORCH-STATE-0043)."""
        if self._fanout is not None and task_id not in self.registry.live:
            row = self._db.get_task(task_id)
            # pg-queue: a queued task lives only in the database; its cancel ends it there.
            if row is not None and row.state in (QUEUED, RUNNING):
                await self._fanout.request_cancel(task_id)
                return
        self.cancel(task_id)
        await self.durable()

    def _cancel_held(self, task_id: str) -> None:
        """A cancel another instance recorded: this instance cancels the task if it holds it."""
        if task_id in self.registry.live:
            self.cancel(task_id)

    async def durable(self) -> None:
        """Return once every commit so far is durable, and every end it holds published."""
        await self._db.durable()

    def stream(self, task_id: str) -> EventStream:
        found = self.registry.stream(task_id)
        if found is not None:
            return found
        row = self._db.get_task(task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} not found")
        return self._replay(row)

    def open_stream(self, task_id: str, caller: Caller) -> TaskStream:
        """The task's row, read once, and its event stream; TaskNotFound unless ``caller`` may
        see it."""
        row = self.row(task_id, caller)
        live = self.registry.stream(task_id)
        return TaskStream(row=row, events=live if live is not None else self._replay(row))

    def _replay(self, row: TaskRow) -> EventStream:
        """The stream of a task no longer in memory: the transcript in its trace, else only
        its terminal frame, from its row. In cluster mode: its durable transcript, written by the
        instance that runs it (scheduler.remote_stream)."""
        if self._fanout is not None:
            return self._fanout.stream(row.task_id)
        return replay_from_trace(self._artifacts, row) or replay_from_row(row)

    def row(self, task_id: str, caller: Caller) -> TaskRow:
        """The task's row; TaskNotFound unless it exists and ``caller`` may see it (another key's
        task is not found, rather than forbidden: its existence is not told)."""
        row = self._db.get_task(task_id)
        if row is None or not caller.can_see(row.owner):
            raise TaskNotFound(f"task {task_id} not found")
        return row

    def task(self, task_id: str, caller: Caller) -> TaskSnapshot:
        return task_snapshot(self.registry, self.row(task_id, caller))

    def tasks(
        self,
        *,
        session_id: str | None,
        state: str | None,
        limit: int,
        cursor: str | None,
        caller: Caller,
    ) -> TaskPage:
        # The cursor is the sequence number of the last task of the previous page.
        # Any 19-digit string is a valid cursor: clamp it to what SQLite can compare.
        before = min(int(cursor), 2**63 - 1) if cursor is not None else None
        rows = self._db.list_tasks(
            session_id=session_id,
            state=state,
            limit=limit + 1,
            before_seq=before,
            owner=caller.visible_to,
        )
        page = rows[:limit]
        next_cursor = str(page[-1].seq) if len(rows) > limit else None
        return TaskPage(tuple(task_snapshot(self.registry, r) for r in page), next_cursor)

    def capabilities(self) -> list[PoolSnapshot]:
        return [pool_snapshot(p) for p in self.registry.pools.values()]

    @property
    def ready(self) -> bool:
        return not self.closing and any(p.ready for p in self.registry.pools.values())

    def remaining(self, session_id: str) -> Remaining:
        return self.sessions.remaining_for(session_id)


__all__ = ["Admission", "Caller", "Scheduler"]
