"""The dispatcher's loops: one per pool starts queued tasks on free replica slots, one per pool
probes its replicas, and one checkpoints the progress of running tasks.

Every run (:class:`llorch.scheduler.engine_call.EngineCall`) is a child task the dispatcher owns,
so shutdown can wait for it and cancel it; the run itself owns its task from start to end.
A health probe checks every replica (readiness, and the half-open trial of an open circuit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from llorch.clock import Clock
from llorch.config import Settings
from llorch.errors import DeadlineUnmet, EngineError, QueueTimeout, StorageError
from llorch.persistence import Storage
from llorch.scheduler.cluster_queue import ClusterQueue
from llorch.scheduler.engine_call import EngineCall, RunContext
from llorch.scheduler.pools import Placement, PoolRuntime, Replica
from llorch.scheduler.registry import Registry
from llorch.scheduler.settle import Settlement
from llorch.scheduler.task import FAILED, RUNNING, TaskRecord
from llorch.sessions import SessionService

log = logging.getLogger("llorch.dispatcher")


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        db: Storage,
        sessions: SessionService,
        settings: Settings,
        clock: Clock,
        settlement: Settlement,
    ) -> None:
        self._registry = registry
        self._db = db
        self._settings = settings
        self._clock = clock
        self._settlement = settlement
        self._run_context = RunContext(
            db, sessions, settlement, clock, settings.server.metrics_every_tokens
        )
        self._progress: dict[str, int] = {}  # tokens_out last checkpointed, by task
        self._tasks: set[asyncio.Task[None]] = set()
        self.dispatching = True
        self.cluster: ClusterQueue | None = None  # cluster mode: the shared queue

    # -- ownership --------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        for pool in self._registry.pools.values():
            await self._probe(pool)
            self.spawn(self._pool_loop(pool), f"pool:{pool.id}")
            self.spawn(self._health_loop(pool), f"health:{pool.id}")
        if self.cluster is not None:
            self.spawn(self.cluster.sweep_loop(), "sweep")
        if self._settings.server.progress_interval_ms:
            self.spawn(self._progress_loop(), "progress")

    async def quiesce(self, grace_s: float) -> None:
        """Stop starting tasks, let running ones finish for ``grace_s``, cancel the rest.

        Queued tasks stay queued in the database: they run again after the restart.
        """
        self.dispatching = False
        running = [r.runner for r in self._registry.live.values() if r.runner is not None]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for record in list(self._registry.live.values()):
                if record.runner in pending:
                    record.cancel_requested = True
                    record.runner.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)

    async def stop(self, grace_s: float) -> None:
        """Quiesce, then end the loops this dispatcher owns."""
        await self.quiesce(grace_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- loops ------------------------------------------------------------------------------

    async def _pool_loop(self, pool: PoolRuntime) -> None:
        if self.cluster is not None:
            await self._shared_loop(self.cluster, pool)
            return
        loop = asyncio.get_running_loop()
        while True:
            # Woken by admission, a freed slot, a ready replica, or the soonest wait limit (a
            # timer only while a queued task has one).
            wait_s = pool.next_wait_limit_s(loop.time())
            if wait_s is None:
                await pool.wakeup.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await pool.wakeup.wait()
            pool.wakeup.clear()
            self._end_overdue(pool, loop.time())
            if self.dispatching:
                self._dispatch(pool)

    async def _shared_loop(self, cluster: ClusterQueue, pool: PoolRuntime) -> None:
        """Cluster mode: woken by an admission or a freed slot here, else every poll interval,
        end what waited too long and claim from the shared queue while a slot is free."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cluster.poll_s):
                    await pool.wakeup.wait()
            pool.wakeup.clear()
            try:
                await cluster.end_overdue(pool)
                while self.dispatching and (claimed := await cluster.claim_next(pool)) is not None:
                    self._start(pool, *claimed)
            except StorageError as exc:
                log.debug("pool %s: the shared queue is not reachable: %s", pool.id, exc)
            except Exception:  # a bug: logged, and the pool goes on dispatching
                log.exception("pool %s: dispatching from the shared queue failed", pool.id)

    def _end_overdue(self, pool: PoolRuntime, now: float) -> None:
        """End the tasks that waited in the queue past their wait limit (ORCH-DATA-0097)."""
        for record in pool.overdue(now):
            waited_ms = self._clock.now_ms() - record.row.created_ms
            self._settlement.end_now(
                record,
                FAILED,
                error=QueueTimeout(
                    f"waited {waited_ms} ms in the queue of pool {pool.id}, past its wait limit",
                    retry_after_ms=pool.retry_after()[1],
                    pool_id=pool.id,
                ),
            )

    def _dispatch(self, pool: PoolRuntime) -> None:
        while (head := pool.queue.peek()) is not None:
            placement = pool.place(head)
            if placement is None:
                return
            pool.queue.pop()
            pool.record_queue()
            self._start(pool, head, placement)

    def _start(self, pool: PoolRuntime, head: TaskRecord, placement: Placement) -> None:
        """Run a task taken from the queue on its placement's replica (its deadline passed:
        end it instead)."""
        if head.deadline_at is not None and asyncio.get_running_loop().time() >= head.deadline_at:
            self._settlement.end_now(
                head, FAILED, error=DeadlineUnmet("deadline passed while queued")
            )
            return
        replica = placement.replica
        replica.busy += 1
        pool.placed(head, placement)
        pool.record_replicas()
        pool.metrics.inc("llorch_tasks_started_total", pool_id=pool.id, replica_id=replica.id)
        pool.metrics.observe(
            "llorch_queue_wait_seconds",
            max(0, self._clock.now_ms() - head.row.created_ms) / 1000,
            pool_id=pool.id,
        )
        call = EngineCall(pool, head, replica, self._run_context)
        head.runner = self.spawn(call.run(), f"task:{head.task_id}")

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.server.progress_interval_ms / 1000)
            await self.checkpoint()

    async def checkpoint(self) -> None:
        """Record how many tokens each running task has produced since the last checkpoint, in
        one transaction (through Storage.run): what a restart charges a task it cut short
        (ORCH-STATE-0005)."""
        moved = [
            (r.task_id, r.tokens_out)
            for r in self._registry.live.values()
            if r.state == RUNNING and not r.ending and r.tokens_out != self._progress.get(r.task_id)
        ]
        self._progress = {
            t: n for t, n in self._progress.items() if t in self._registry.live
        } | dict(moved)
        if not moved:
            return
        try:
            await self._db.run(self._db.record_progress, moved, self._clock.now_ms())
        except StorageError as exc:
            for task_id, _ in moved:  # checkpointed at the next chance
                self._progress.pop(task_id, None)
            log.warning("could not checkpoint the progress of %d tasks: %s", len(moved), exc)

    async def _health_loop(self, pool: PoolRuntime) -> None:
        while True:
            await asyncio.sleep(pool.settings.health_interval_ms / 1000)
            await self._probe(pool)

    async def _probe(self, pool: PoolRuntime) -> None:
        # Concurrently: a replica that does not answer must not delay the others' probes.
        await asyncio.gather(*(self._probe_replica(pool, r) for r in pool.replicas))
        pool.record_state()
        pool.record_replicas()

    async def _probe_replica(self, pool: PoolRuntime, replica: Replica) -> None:
        was_serving = replica.serving
        trial = replica.breaker.trial_due()
        why = "health check failed"
        try:
            ready = await replica.engine.health()
        except EngineError as exc:
            ready, why = False, exc.message
        if trial:
            replica.breaker.trial_result(ready)
            log.info("replica %s: half-open probe %s", replica.id, "passed" if ready else "failed")
        if not ready:
            replica.last_error = why
        replica.ready = ready
        # The engine's own load, read with its health (ORCH-ENG-0025); none from a failed probe.
        replica.engine_load = replica.engine.load if ready else None
        replica.busy_at_reading = replica.busy
        if replica.serving and not was_serving:
            pool.wakeup.set()
