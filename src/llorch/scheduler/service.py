"""The scheduler's face to the edge: admit, read, list, cancel and subscribe to tasks.

The coroutines here make their storage calls through :meth:`Storage.run` (on PostgreSQL a
worker thread, the event loop serving meanwhile: ORCH-STATE-0060); the plain methods call
storage inline, for the embedded store and its tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from llorch.artifacts import ArtifactStore
from llorch.clock import Clock
from llorch.config import PoolSettings, Settings
from llorch.contracts import metrics_contract
from llorch.engines import build_engines
from llorch.engines.base import Engine
from llorch.errors import (
    BudgetExhausted,
    LlorchError,
    ShuttingDown,
    StorageBusy,
    StorageError,
    TaskNotFound,
)
from llorch.metrics import Metrics
from llorch.persistence import Storage, TaskRow, retry_busy
from llorch.persistence.pg_queue import PgQueue
from llorch.scheduler.admission import Admission, Admitter
from llorch.scheduler.caller import ANYONE, Caller
from llorch.scheduler.cluster_control import ClusterPoolOperations
from llorch.scheduler.cluster_queue import ClusterQueue
from llorch.scheduler.control import PoolOperations
from llorch.scheduler.dispatcher import Dispatcher
from llorch.scheduler.events import EventStream
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.registry import Registry
from llorch.scheduler.remote_stream import CONTROL_CHANNEL, QUEUE_CHANNEL, Fanout
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
        self._cluster = self._shared_queue(db)
        self.pools = (
            PoolOperations(self.registry, self._dispatcher, self.cancel, engines)
            if db.cluster is None
            else ClusterPoolOperations(
                self.registry, self._dispatcher, self.cancel, engines, db.cluster, self.metrics, db
            )
        )
        self.closing = False
        self._background: set[asyncio.Task[None]] = set()  # cancels that read storage
        self._fanout = self._join(links) if links is not None else None

    def _join(self, links: ClusterLinks) -> Fanout:
        """Cluster mode: this instance's streams are recorded, and other instances' tasks
        are streamed and cancelled through the database (scheduler.remote_stream)."""
        fanout = Fanout(links, self._db, self._clock, self._artifacts)
        fanout.cancel_held = self._cancel_held
        fanout.held = lambda: list(self.registry.live)
        self.registry.on_add = fanout.record
        listener = links.listener
        if self._cluster is not None:  # a task queued anywhere wakes every dispatcher
            listener.listen(QUEUE_CHANNEL, self._cluster.wake)
            self._cluster.announce = functools.partial(listener.notify, QUEUE_CHANNEL)
        if isinstance(self.pools, ClusterPoolOperations):  # so does a drain, resume or reload
            listener.listen(CONTROL_CHANNEL, lambda _: self._wake_control())
            self.pools.announce = functools.partial(listener.notify, CONTROL_CHANNEL, "")
        return fanout

    def _wake_control(self) -> None:
        if isinstance(self.pools, ClusterPoolOperations):
            self.pools.wake()

    def _shared_queue(self, db: Storage) -> ClusterQueue | None:
        """Cluster mode (a store with a shared queue: PostgreSQL): the queue the admitter and
        the dispatcher share with the other instances; None on SQLite."""
        store = getattr(db, "queue", None)
        if not isinstance(store, PgQueue):
            return None
        cluster = ClusterQueue(
            store, db, self.registry, self.sessions, self._settlement, self._settings, self._clock
        )
        cluster.revive = self._admitter.revive
        self._admitter.cluster = cluster
        self._dispatcher.cluster = cluster
        return cluster

    async def start(self) -> None:
        await self._reconcile()
        if self._fanout is not None:
            await self._fanout.catch_up_cancels()  # asked of restored tasks while it was down
        await self._dispatcher.start()
        self.metrics.set("llorch_instances_live", 1)  # a cluster's sync counts the others
        if isinstance(self.pools, ClusterPoolOperations):
            try:
                await self.pools.sync()  # the cluster's drains and reloads, before serving
            except StorageError as exc:  # applied by the loop once the database answers
                log.warning("cannot read the cluster's pool control at start: %s", exc)
            pools = self._settings.pools
            interval_s = min((p.health_interval_ms for p in pools), default=1000) / 1000
            self._dispatcher.spawn(self.pools.run(interval_s), "cluster-control")

    @property
    def live_instances(self) -> int:
        """How many instances share the database (1 on SQLite), as of the last sync."""
        return self.pools.live_instances if isinstance(self.pools, ClusterPoolOperations) else 1

    async def quiesce(self) -> None:
        """Stop admitting (SHUTTING_DOWN), give running tasks the grace period, cancel the rest."""
        self.closing = True
        await self._dispatcher.quiesce(self._settings.server.shutdown_grace_s)

    async def stop(self) -> None:
        self.closing = True
        await self._dispatcher.stop(self._settings.server.shutdown_grace_s)
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._settlement.stop()
        if self._fanout is not None:
            await self._fanout.close()
        for pool in self.registry.pools.values():
            for replica in pool.replicas:
                await replica.engine.close()

    async def _reconcile(self) -> None:
        """After a restart: queued tasks are queued again; tasks that were running end with a
        retriable WORKER_RESET (their engine call is gone). Nothing accepted is left open. In
        cluster mode queued tasks stay in the shared queue, and only the open tasks outside it
        that are this instance's are ended (ORCH-STATE-0035)."""
        db, settlement = self._db, self._settlement
        if self._cluster is not None:
            rows = await db.run(self._cluster.store.adopt_own)
        else:
            rows = await db.run(db.tasks_in_states, [RUNNING, QUEUED])
        for row in rows:
            try:
                if row.state == QUEUED and self._cluster is None and self._admitter.restore(row):
                    continue
                await retry_busy(db, functools.partial(settlement.reconcile, row))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                await retry_busy(db, functools.partial(settlement.quarantine, row, exc))

    # -- operations -------------------------------------------------------------------------

    def admit(
        self, body: Mapping[str, Any], correlation_id: str, caller: Caller = ANYONE
    ) -> Admission:
        """Admit a task now, on the embedded store (cluster mode: :meth:`admit_when_free`);
        StorageBusy (uncounted) when the write lock is held elsewhere."""
        self._check_open()
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
        admission writes nothing before its one transaction), the event loop free meanwhile.
        In cluster mode the admission's storage calls run in worker threads."""
        cluster = self._cluster
        if cluster is None:
            admit = functools.partial(self.admit, body, correlation_id, caller)
            try:
                return await retry_busy(self._db, lambda: self._db.run(admit))
            except StorageBusy as exc:
                self._count_rejection(exc)
                raise
        self._check_open()
        try:
            return await self._admitter.admit_shared(cluster, body, correlation_id, caller)
        except LlorchError as exc:
            self._count_rejection(exc)
            raise

    def _check_open(self) -> None:
        if self.closing:
            self.metrics.inc("llorch_tasks_rejected_total", code="SHUTTING_DOWN")
            raise ShuttingDown("the server is shutting down", retry_after_ms=1000)

    def _count_rejection(self, exc: LlorchError) -> None:
        self.metrics.inc("llorch_tasks_rejected_total", code=exc.code)
        if isinstance(exc, BudgetExhausted) and exc.policy_label:
            self.metrics.inc("llorch_budget_rejections_total", policy_label=exc.policy_label)

    def cancel(self, task_id: str) -> None:
        """Cancel a task; idempotent, and a no-op for a task that already ended. A task not
        held here, on a store that offloads, is cancelled by a task of its own (an unknown id
        is then only logged)."""
        record = self.registry.live.get(task_id)
        if record is None and self._db.offloads:
            self._own(self._cancel_stored_logged(task_id), f"cancel:{task_id}")
            return
        if record is None:
            row = self._db.get_task(task_id)
            if row is None:
                raise TaskNotFound(f"task {task_id} not found")
            return
        self._cancel_held(task_id)

    async def _cancel_stored(self, task_id: str) -> None:
        """Cancel a task this instance does not hold, through storage."""
        if self._cluster is not None and await self._cluster.cancel(task_id):
            return  # it was queued: ended canceled, whichever instance admitted it
        row = await self._db.run(self._db.get_task, task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} not found")
        if self._fanout is not None and row.state in (QUEUED, RUNNING):
            self._fanout.request_cancel_soon(task_id)  # another instance holds it

    async def _cancel_stored_logged(self, task_id: str) -> None:
        try:
            await self._cancel_stored(task_id)
        except (LlorchError, StorageError) as exc:
            log.warning("task %s: could not cancel it: %s", task_id, exc)

    def _own(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _cancel_held(self, task_id: str) -> None:
        """Cancel a task this instance holds (a cancel another instance recorded, too)."""
        record = self.registry.live.get(task_id)
        if record is None:
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
        if task_id in self.registry.live or not self._db.offloads:
            self.cancel(task_id)
        elif self._fanout is not None:
            # A queued task lives only in the database: its cancel ends it there (ORCH-STATE-0034).
            if self._cluster is not None and await self._cluster.cancel(task_id):
                await self.durable()
                return
            row = await self._db.run(self._db.get_task, task_id)
            if row is None:
                raise TaskNotFound(f"task {task_id} not found")
            if row.state in (QUEUED, RUNNING):
                await self._fanout.request_cancel(task_id)
                return
        else:
            await self._cancel_stored(task_id)
        await self.durable()

    async def durable(self) -> None:
        """Return once every commit so far is durable, and every end it holds published."""
        await self._db.durable()
        await self._settlement.settled()

    def stream(self, task_id: str) -> EventStream:
        found = self._live_stream(task_id)
        if found is not None:
            return found
        row = self._db.get_task(task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} not found")
        return self._replay(row)

    async def fetch_stream(self, task_id: str) -> EventStream:
        """:meth:`stream`, its read of the row through Storage.run."""
        found = self._live_stream(task_id)
        if found is not None:
            return found
        row = await self._db.run(self._db.get_task, task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} not found")
        return self._replay(row)

    async def open_stream(self, task_id: str, caller: Caller) -> TaskStream:
        """The task's row, read once, and its event stream; TaskNotFound unless ``caller`` may
        see it."""
        row = await self.row(task_id, caller)
        live = self._live_stream(task_id)
        return TaskStream(row=row, events=live if live is not None else self._replay(row))

    def _live_stream(self, task_id: str) -> EventStream | None:
        """The task's stream in memory: running or recently ended here, or (cluster mode)
        admitted here and still queued."""
        found = self.registry.stream(task_id)
        if found is None and self._cluster is not None and self._fanout is None:
            found = self._cluster.stream(task_id)
        return found

    def _replay(self, row: TaskRow) -> EventStream:
        """The stream of a task no longer in memory: the transcript in its trace, else only
        its terminal frame, from its row. In cluster mode: its durable transcript, written by the
        instance that runs it (scheduler.remote_stream), whether it is queued still, running
        elsewhere or ended; without the fan-out, a task still in the shared queue is watched
        from here (ORCH-STATE-0030)."""
        if self._fanout is not None:
            return self._fanout.stream(row.task_id)
        if self._cluster is not None and (watched := self._cluster.watch(row)) is not None:
            return watched
        return replay_from_trace(self._artifacts, row) or replay_from_row(row)

    async def row(self, task_id: str, caller: Caller) -> TaskRow:
        """The task's row; TaskNotFound unless it exists and ``caller`` may see it (another key's
        task is not found, rather than forbidden: its existence is not told)."""
        row = await self._db.run(self._db.get_task, task_id)
        await self._settlement.settled()  # an end the read saw committed is published first
        if row is None or not caller.can_see(row.owner):
            raise TaskNotFound(f"task {task_id} not found")
        return row

    async def task(self, task_id: str, caller: Caller) -> TaskSnapshot:
        snapshot = task_snapshot(self.registry, await self.row(task_id, caller))
        if self._cluster is not None and snapshot.state == QUEUED:
            position = await self._cluster.position(snapshot.row)
            snapshot = dataclasses.replace(snapshot, queue_position=position)
        return snapshot

    async def tasks(
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
        rows = await self._db.run(
            self._db.list_tasks,
            session_id=session_id,
            state=state,
            limit=limit + 1,
            before_seq=before,
            owner=caller.visible_to,
        )
        await self._settlement.settled()  # ends the read saw committed are published first
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

    async def fetch_remaining(self, session_id: str) -> Remaining:
        """:meth:`remaining`, its read through Storage.run."""
        return await self.sessions.fetch_remaining(session_id)


__all__ = ["Admission", "Caller", "Scheduler"]
