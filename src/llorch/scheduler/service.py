"""The scheduler's face to the edge: admit, read, list, cancel and subscribe to tasks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from llorch.artifacts import ArtifactStore
from llorch.clock import Clock
from llorch.config import PoolSettings, Settings
from llorch.contracts import metrics_contract
from llorch.engines import build_engines
from llorch.engines.base import Engine
from llorch.errors import BudgetExhausted, LlorchError, ShuttingDown, TaskNotFound, WorkerReset
from llorch.metrics import Metrics
from llorch.persistence import Database, TaskRow
from llorch.scheduler.admission import ANYONE, Admission, Admitter, Caller
from llorch.scheduler.control import PoolOperations, pool_capabilities
from llorch.scheduler.dispatcher import Dispatcher
from llorch.scheduler.events import EventStream
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.registry import Registry
from llorch.scheduler.replay import replay_from_trace
from llorch.scheduler.task import CANCELED, FAILED, QUEUED, RUNNING, TERMINAL_STATES
from llorch.sessions import SessionService
from llorch.sessions.service import Remaining

log = logging.getLogger("llorch.scheduler")

EngineFactory = Callable[[PoolSettings, int], list[Engine]]


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        sessions: SessionService,
        clock: Clock,
        engines: EngineFactory = build_engines,
        artifacts: ArtifactStore | None = None,
        metrics: Metrics | None = None,
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
        self._dispatcher = Dispatcher(self.registry, db, sessions, settings, clock, artifacts)
        self._admitter = Admitter(
            self.registry, db, sessions, settings, clock, self._dispatcher.finish
        )
        self.pools = PoolOperations(self.registry, self._dispatcher, self.cancel, engines)
        self.closing = False

    async def start(self) -> None:
        self._reconcile()
        await self._dispatcher.start()

    async def quiesce(self) -> None:
        """Stop admitting (SHUTTING_DOWN), give running tasks the grace period, cancel the rest."""
        self.closing = True
        await self._dispatcher.quiesce(self._settings.server.shutdown_grace_s)

    async def stop(self) -> None:
        self.closing = True
        await self._dispatcher.stop(self._settings.server.shutdown_grace_s)
        for pool in self.registry.pools.values():
            for replica in pool.replicas:
                await replica.engine.close()

    def _reconcile(self) -> None:
        """After a restart: queued tasks are queued again; tasks that were running end with a
        retriable WORKER_RESET (their engine call is gone). Nothing accepted is left open."""
        for row in self._db.tasks_in_states([RUNNING, QUEUED]):
            if row.state == QUEUED and self._admitter.restore(row):
                continue
            error = WorkerReset("the server restarted while the task was in flight")
            # Its events died with the process; the terminal frame gets an id above any a client
            # can have seen (started, one token and at most one metrics frame per token), so a
            # Last-Event-ID resume still reaches it.
            max_tokens = int(json.loads(row.request_json).get("max_tokens", 0))
            self._db.update_task(
                row.task_id,
                state=FAILED,
                ended_ms=self._clock.now_ms(),
                error_code=error.code,
                error_message=error.message,
                error_retriable=True,
                terminal_event_id=2 * max_tokens + 2,
            )

    # -- operations -------------------------------------------------------------------------

    def admit(
        self, body: Mapping[str, Any], correlation_id: str, caller: Caller = ANYONE
    ) -> Admission:
        if self.closing:
            self.metrics.inc("llorch_tasks_rejected_total", code="SHUTTING_DOWN")
            raise ShuttingDown("the server is shutting down", retry_after_ms=1000)
        try:
            return self._admitter.admit(body, correlation_id, caller)
        except LlorchError as exc:
            self.metrics.inc("llorch_tasks_rejected_total", code=exc.code)
            if isinstance(exc, BudgetExhausted) and exc.policy_label:
                self.metrics.inc("llorch_budget_rejections_total", policy_label=exc.policy_label)
            raise

    def cancel(self, task_id: str) -> None:
        """Cancel a task; idempotent, and a no-op for a task that already ended."""
        record = self.registry.live.get(task_id)
        if record is None:
            if self._db.get_task(task_id) is None:
                raise TaskNotFound(f"task {task_id} not found")
            return
        if record.cancel_requested or record.ending:
            return
        record.cancel_requested = True
        if record.state == QUEUED and record.runner is None:
            pool = self.registry.pools[record.pool_id]
            pool.queue.remove(record, record.priority)
            pool.record_queue()
            self._dispatcher.finish(record, CANCELED, finish_reason="canceled")
        elif record.state == RUNNING and record.runner is not None:
            # The flag is set before this returns, so no token frame follows the cancel.
            record.runner.cancel()

    def stream(self, task_id: str) -> EventStream:
        found = self.registry.stream(task_id)
        if found is not None:
            return found
        row = self._db.get_task(task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} not found")
        # Evicted from memory: the transcript in its trace, else the terminal frame from its row.
        return replay_from_trace(self._artifacts, row) or _replay_from_row(row)

    def task(self, task_id: str) -> dict[str, Any]:
        row = self._db.get_task(task_id)
        if row is None:
            raise TaskNotFound(f"task {task_id} not found")
        return self._view(row)

    def tasks(
        self,
        *,
        session_id: str | None,
        state: str | None,
        limit: int,
        cursor: str | None,
        visible_to: str | None = None,
    ) -> dict[str, Any]:
        # The cursor is the sequence number of the last task of the previous page.
        # Any 19-digit string is a valid cursor: clamp it to what SQLite can compare.
        before = min(int(cursor), 2**63 - 1) if cursor is not None else None
        rows = self._db.list_tasks(
            session_id=session_id, state=state, limit=limit + 1, before_seq=before, owner=visible_to
        )
        page = rows[:limit]
        next_cursor = str(page[-1].seq) if len(rows) > limit else None
        return {"items": [self._view(r) for r in page], "next_cursor": next_cursor}

    def capabilities(self) -> list[dict[str, Any]]:
        return [pool_capabilities(p) for p in self.registry.pools.values()]

    @property
    def ready(self) -> bool:
        return not self.closing and any(p.ready for p in self.registry.pools.values())

    def remaining(self, session_id: str) -> Remaining:
        return self.sessions.remaining_for(session_id)

    def _view(self, row: TaskRow) -> dict[str, Any]:
        record = self.registry.live.get(row.task_id)
        state = record.state if record is not None else row.state
        position = None
        if record is not None and state == QUEUED:
            pool = self.registry.pools[row.pool_id]
            position = pool.queue.position(record, record.priority)
        error = None
        if row.error_code is not None and state in TERMINAL_STATES:
            error = {
                "code": row.error_code,
                "message": row.error_message or "",
                "retriable": bool(row.error_retriable),
            }
        view: dict[str, Any] = {
            "task_id": row.task_id,
            "session_id": row.session_id,
            "model": row.model,
            "priority": row.priority,
            "state": state,
            "queue_position": position,
            "pool_id": row.pool_id,
            "replica_id": row.replica_id,
            "finish_reason": row.finish_reason,
            "usage": {"tokens_in": row.tokens_in, "tokens_out": row.tokens_out, "cost": row.cost},
            "timings": {
                "created_ms": row.created_ms,
                "started_ms": row.started_ms,
                "ended_ms": row.ended_ms,
                "ttft_ms": row.ttft_ms,
                "decode_time_ms": row.decode_time_ms,
            },
            "trace_artifact_id": row.trace_artifact_id,
        }
        if error is not None:
            view["error"] = error
        return view


def _replay_from_row(row: TaskRow) -> EventStream:
    """A stream for a task whose events are no longer in memory: only its terminal event, under
    its original id (earlier ids are gone: a client sees the gap)."""
    stream = EventStream(first_seq=row.terminal_event_id or 0)
    if row.state not in TERMINAL_STATES:
        # Unreachable while the process lives (live tasks keep their stream); kept total.
        stream.publish(
            "error",
            {"code": "WORKER_RESET", "message": "task events were lost", "retriable": True},
        )
    elif row.error_code is not None:
        stream.publish(
            "error",
            {
                "code": row.error_code,
                "message": row.error_message or "",
                "retriable": bool(row.error_retriable),
            },
        )
    else:
        stream.publish(
            "end",
            {
                "tokens_in": row.tokens_in,
                "tokens_out": row.tokens_out,
                "ttft_ms": row.ttft_ms,
                "decode_time_ms": row.decode_time_ms or 0,
                "cost": row.cost,
                "finish_reason": row.finish_reason or "stop",
            },
        )
    return stream


__all__ = ["Admission", "Caller", "Scheduler"]
