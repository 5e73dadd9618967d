"""Running tasks: one loop per pool starts queued tasks on free replica slots.

Every engine call is a child task owned by the dispatcher, bounded by the task's deadline and by
the pool's decode timeout (the longest silence allowed between two chunks); retries before the
first token and circuit breakers are :mod:`llorch.scheduler.engine_call`'s. A health loop per
pool probes every replica (readiness, and the half-open trial of an open circuit). Whatever way
a task ends, :meth:`Dispatcher.finish` records it exactly once: usage committed to the session, the
final row written, then the one terminal event published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from llorch.artifacts import ArtifactStore
from llorch.artifacts.store import Prepared
from llorch.clock import Clock
from llorch.config import Settings
from llorch.errors import DeadlineUnmet, EngineError, LlorchError, StorageError
from llorch.persistence import ArtifactInsert, Database
from llorch.scheduler.ending import Ending, conclude, trace_document
from llorch.scheduler.engine_call import EngineCall
from llorch.scheduler.pools import PoolRuntime, Replica
from llorch.scheduler.registry import Registry
from llorch.scheduler.task import (
    CANCELED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TaskRecord,
)
from llorch.sessions import Reservation, SessionService

log = logging.getLogger("llorch.dispatcher")


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        db: Database,
        sessions: SessionService,
        settings: Settings,
        clock: Clock,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self._registry = registry
        self._db = db
        self._sessions = sessions
        self._settings = settings
        self._clock = clock
        self._artifacts = artifacts
        self._tasks: set[asyncio.Task[None]] = set()
        self.dispatching = True

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
        while True:
            await pool.wakeup.wait()
            pool.wakeup.clear()
            if self.dispatching:
                self._dispatch(pool)

    def _dispatch(self, pool: PoolRuntime) -> None:
        loop = asyncio.get_running_loop()
        while (head := pool.queue.peek()) is not None:
            placement = pool.place(head)
            if placement is None:
                return
            replica = placement.replica
            pool.queue.pop()
            if head.deadline_at is not None and loop.time() >= head.deadline_at:
                pool.record_queue()
                self.finish(head, FAILED, error=DeadlineUnmet("deadline passed while queued"))
                continue
            replica.busy += 1
            pool.placed(head, placement)
            pool.record_queue()
            pool.record_replicas()
            pool.metrics.inc("llorch_tasks_started_total", pool_id=pool.id, replica_id=replica.id)
            pool.metrics.observe(
                "llorch_queue_wait_seconds",
                max(0, self._clock.now_ms() - head.row.created_ms) / 1000,
                pool_id=pool.id,
            )
            head.runner = self.spawn(self._run(pool, replica, head), f"task:{head.task_id}")

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
        if replica.serving and not was_serving:
            pool.wakeup.set()

    # -- one task ---------------------------------------------------------------------------

    async def _run(self, pool: PoolRuntime, replica: Replica, record: TaskRecord) -> None:
        call = EngineCall(pool, record, replica, self._db, self._relay_token)
        try:
            if record.cancel_requested:  # canceled between dispatch and this first step
                self.finish(record, CANCELED, finish_reason="canceled")
                return
            self._start(pool, replica, record)
            finish = await call.run()
            record.tokens_cached = finish.tokens_cached
            ending = conclude(
                record,
                SUCCEEDED,
                clock=self._clock,
                pricing=self._settings.pricing,
                finish_reason=finish.finish_reason,
                tokens_in=finish.tokens_in,
                tokens_out=finish.tokens_out,
            )
            await self._settle_after_trace(ending)
        except (EngineError, DeadlineUnmet) as exc:
            call.replica.last_error = exc.message
            ending = conclude(
                record,
                FAILED,
                clock=self._clock,
                pricing=self._settings.pricing,
                error=exc,
                tokens_out=call.tokens_out,
            )
            await self._settle_after_trace(ending)
        except asyncio.CancelledError:
            if not record.ending:  # else it was cancelled while its end was written: it ended
                self.finish(record, CANCELED, finish_reason="canceled", tokens_out=call.tokens_out)
            if not record.cancel_requested:
                raise
        except Exception as exc:  # a bug: the task still ends, loudly
            log.exception("task %s failed unexpectedly", record.task_id)
            if not record.ending:
                self.finish(record, FAILED, error=LlorchError(f"internal error: {exc}"))
        finally:
            call.replica.busy -= 1
            pool.record_replicas()
            ended = asyncio.get_running_loop().time()
            first = call.first_token_at
            pool.meter.record(
                service_s=ended - call.started,
                ttft_s=None if first is None else first - call.started,
                tokens=call.tokens_out,
                decode_s=0.0 if first is None else ended - first,
            )
            pool.wakeup.set()
            pool.task_ended()

    def _relay_token(self, call: EngineCall, text: str) -> None:
        """Publish the call's next token (its first one also sets the task's TTFT)."""
        pool, record = call.pool, call.record
        assert call.first_token_at is not None
        if call.tokens_out == 0:
            ttft_s = call.first_token_at - call.started
            record.ttft_ms = round(ttft_s * 1000)
            pool.metrics.observe(
                "llorch_ttft_seconds", ttft_s, pool_id=pool.id, engine=call.replica.engine.engine
            )
        record.events.publish("token", {"t": text, "i": call.tokens_out})
        if (call.tokens_out + 1) % self._settings.server.metrics_every_tokens == 0:
            self._publish_metrics(pool, record, call.tokens_out + 1, call.first_token_at)

    def _start(self, pool: PoolRuntime, replica: Replica, record: TaskRecord) -> None:
        now = self._clock.now_ms()
        record.move_to(RUNNING)
        record.replica_id = replica.id
        record.started_ms = now
        self._db.place_task(
            record.task_id,
            record.session_id,
            pool_id=pool.id,
            replica_id=replica.id,
            state=RUNNING,
            started_ms=now,
        )
        log.info(
            "task running",
            extra={
                "event": "task",
                "task_id": record.task_id,
                "state": RUNNING,
                "pool_id": pool.id,
                "replica_id": replica.id,
                "correlation_id": record.row.correlation_id,
            },
        )
        record.events.publish(
            "started",
            {
                "task_id": record.task_id,
                "queue_position": record.queue_position_at_start,
                "pool_id": pool.id,
                "replica_id": replica.id,
                "engine": replica.engine.engine,
                "kv_warmth": replica.id == record.affinity_replica_id,
                "placement": record.placement,
                "correlation_id": record.row.correlation_id,
            },
        )

    def _publish_metrics(
        self, pool: PoolRuntime, record: TaskRecord, tokens_out: int, first_token_at: float
    ) -> None:
        elapsed = asyncio.get_running_loop().time() - first_token_at
        left = self._sessions.remaining_for(record.session_id)
        record.events.publish(
            "metrics",
            {
                "queue_depth": len(pool.queue),
                "tokens_out": tokens_out,
                "tokens_per_s": round(tokens_out / elapsed, 3) if elapsed > 0 else 0.0,
                "budgets": {
                    "tokens_remaining": left.tokens,
                    "time_ms_remaining": left.time_ms,
                    "cost_remaining": left.cost,
                },
            },
        )

    # -- the one way a task ends ------------------------------------------------------------

    def finish(
        self,
        record: TaskRecord,
        state: str,
        *,
        finish_reason: str | None = None,
        error: LlorchError | None = None,
        tokens_in: int | None = None,
        tokens_out: int = 0,
    ) -> None:
        """End the task now: its trace written on the spot, its row, then its terminal event."""
        ending = conclude(
            record,
            state,
            clock=self._clock,
            pricing=self._settings.pricing,
            finish_reason=finish_reason,
            error=error,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
        trace: ArtifactInsert | None = None
        try:
            prepared = self._prepare_trace(ending)
            if prepared is not None and self._artifacts is not None:
                self._artifacts.write(prepared)
                trace = self._artifacts.row(prepared)
        except (LlorchError, OSError) as exc:
            self._trace_missing(ending, exc)
        self._settle(ending, trace)

    async def _settle_after_trace(self, ending: Ending) -> None:
        """End the task like :meth:`finish`, with the trace's file written off the event loop.

        The trace's fsyncs take milliseconds; on the loop they would stall every stream. The
        terminal event still goes out only after the trace is stored, so the task links it.
        """
        trace: ArtifactInsert | None = None
        try:
            prepared = self._prepare_trace(ending)
            if prepared is not None and self._artifacts is not None:
                write = asyncio.ensure_future(asyncio.to_thread(self._artifacts.write, prepared))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    # Shut down mid-write: the task still ends, now, without its trace.
                    self._settle(ending, None)
                    raise
                trace = self._artifacts.row(prepared)
        except (LlorchError, OSError) as exc:
            self._trace_missing(ending, exc)
        except Exception as exc:  # a bug: the task still ends, without its trace
            log.exception("task %s: storing its trace failed unexpectedly", ending.record.task_id)
            self._trace_missing(ending, exc)
        self._settle(ending, trace)

    def _settle(self, ending: Ending, trace: ArtifactInsert | None) -> None:
        """Release the reservation, commit usage, the final row and the row of the trace (whose
        body is on disk already) in one transaction, then publish the terminal event."""
        record, state, error, terminal = ending.record, ending.state, ending.error, ending.terminal
        tokens_in, tokens_out, decode_ms = ending.tokens_in, ending.tokens_out, ending.decode_ms
        run_ms, cost, finish_reason = ending.run_ms, ending.cost, ending.finish_reason
        task_values = ending.values
        task_values["trace_artifact_id"] = None if trace is None else trace.artifact_id
        record.move_to(state)
        used = Reservation(tokens=tokens_in + tokens_out, time_ms=run_ms, cost=cost)
        try:
            settled = self._sessions.settle(record.session_id, record.task_id, used)
            self._db.finish_task(
                record.task_id, task_values, record.session_id, settled.values, trace=trace
            )
            self._record_overrun(record, settled.overrun)
        except StorageError:
            # The terminal event still goes out; on restart the row is reconciled.
            log.exception("could not record the end of task %s", record.task_id)
        record.events.publish(*terminal)
        self._registry.retire(record)
        self._record_end(record, state, error, tokens_in, tokens_out, decode_ms)
        if (pool := self._registry.pools.get(record.pool_id)) is not None:
            pool.task_ended()
        log.info(
            "task ended",
            extra={
                "event": "task",
                "task_id": record.task_id,
                "state": state,
                "pool_id": record.pool_id,
                "replica_id": record.replica_id,
                "correlation_id": record.row.correlation_id,
                "outcome": finish_reason or (error.code if error else None),
                "code": error.code if error else None,
            },
        )

    def _prepare_trace(self, ending: Ending) -> Prepared | None:
        """The task's trace artifact, checked and hashed (None without an artifact store)."""
        if self._artifacts is None:
            return None
        record = ending.record
        pool = self._registry.pools.get(record.pool_id)
        replica = None
        if pool is not None and record.replica_id is not None:
            replica = next((r for r in pool.replicas if r.id == record.replica_id), None)
        return self._artifacts.prepare(
            kind="trace",
            content=trace_document(ending, replica.engine if replica else None),
            tags=("task-trace", ending.state),
            task_id=record.task_id,
            owner=record.row.owner,
        )

    def _trace_missing(self, ending: Ending, exc: Exception) -> None:
        # The task still ends with its terminal event and its final row; the store logged and
        # counted a failed write, and the task's line says its trace is missing.
        task_id = ending.record.task_id
        log.error(
            "could not store the trace of task %s: %s",
            task_id,
            exc,
            extra={"event": "trace_missing", "task_id": task_id},
        )

    def _record_overrun(self, record: TaskRecord, overrun: Reservation | None) -> None:
        """Usage the task's session could not pay: not charged, counted and logged."""
        if overrun is None:
            return
        pool = self._registry.pools.get(record.pool_id)
        for label, amount in (
            ("tokens", overrun.tokens),
            ("time", overrun.time_ms),
            ("cost", overrun.cost),
        ):
            if amount > 0 and pool is not None:
                pool.metrics.inc("llorch_budget_overruns_total", policy_label=label)
        log.warning(
            "task %s used more than its session had left; the excess is not charged",
            record.task_id,
            extra={
                "event": "budget_overrun",
                "task_id": record.task_id,
                "session_id": record.session_id,
                "tokens": overrun.tokens,
                "time_ms": overrun.time_ms,
                "cost": overrun.cost,
            },
        )

    def _record_end(
        self,
        record: TaskRecord,
        state: str,
        error: LlorchError | None,
        tokens_in: int,
        tokens_out: int,
        decode_ms: int,
    ) -> None:
        pool = self._registry.pools.get(record.pool_id)
        if pool is None:
            return
        m, pool_id = pool.metrics, pool.id
        m.inc("llorch_tasks_finished_total", pool_id=pool_id, outcome=state)
        m.inc("llorch_tokens_in_total", tokens_in, pool_id=pool_id, model=record.request.model)
        m.inc("llorch_tokens_out_total", tokens_out, pool_id=pool_id, model=record.request.model)
        if isinstance(error, EngineError):
            m.inc(
                "llorch_engine_errors_total",
                pool_id=pool_id,
                replica_id=record.replica_id or "none",
                code=error.code,
            )
        if record.ttft_ms is not None:
            m.observe("llorch_decode_seconds", decode_ms / 1000, pool_id=pool_id)
