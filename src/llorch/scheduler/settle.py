"""The one door to a task's end: :class:`Settlement`.

Whatever ends a task (its engine call finishing or failing, a cancel, a deadline passed in the
queue, a drop-lru victim, a drain deadline, a restart that found it running) ends it here,
exactly once, in this order:

1. the ending is decided (:func:`llorch.scheduler.ending.conclude`): final values and frame;
2. its trace artifact's body is written (off the event loop when the caller can wait);
3. one transaction releases its reservation and commits its usage, its final row and the row
   of its trace;
4. only once that commit is durable (one fsync shared with the commits around it, see
   :mod:`llorch.persistence.group_sync`): the terminal frame is published, the live task
   forgotten, and the end's metrics and log line recorded.

On a store whose calls leave the event loop (PostgreSQL, ``Storage.offloads``) step 3 runs in a
worker thread, as a task this object owns; steps 1, 2 and 4 stay on the loop, and
:meth:`Settlement.settled` waits for the ends under way (a read after a cancel sees its end).

When storage refuses step 3 (a full disk, a corrupt page, the write lock held past the busy
timeout), the reservation stays held and step 3 is retried with backoff until it commits; the
terminal frame waits for it (ORCH-STATE-0004). A process that dies meanwhile leaves the row
running, and the restart ends it through :meth:`Settlement.reconcile`, charged for the tokens
its last progress checkpoint recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Coroutine
from dataclasses import asdict, replace
from typing import Any

from llorch.artifacts import ArtifactStore
from llorch.artifacts.store import Prepared
from llorch.clock import Clock
from llorch.config import Settings
from llorch.engines.base import estimate_tokens_in
from llorch.errors import EngineError, LlorchError, StorageError, WorkerReset
from llorch.persistence import ArtifactInsert, EndedElsewhere, Storage, TaskRow
from llorch.scheduler.ending import Ending, conclude, error_columns, terminal_frame, trace_document
from llorch.scheduler.events import EventStream
from llorch.scheduler.registry import Registry
from llorch.scheduler.task import FAILED, TERMINAL_STATES, TaskRecord, completion_request
from llorch.sessions import Reservation, SessionService
from llorch.sessions.service import Settled

log = logging.getLogger("llorch.dispatcher")

# Backoff of a task end that storage refused: from 50 ms up to 5 s between attempts.
_RETRY_FIRST_S, _RETRY_MAX_S = 0.05, 5.0
# How long stopping waits for committed ends to become durable before giving their frames up.
_STOP_SYNC_S = 5.0


class Settlement:
    def __init__(
        self,
        registry: Registry,
        db: Storage,
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
        # Ends waiting for storage to take their commit.
        self._retries: set[asyncio.Task[None]] = set()
        # Ends whose first commit is under way in a worker thread (Storage.offloads).
        self._closing: set[asyncio.Task[None]] = set()

    # -- the doors --------------------------------------------------------------------------

    def end_now(
        self,
        record: TaskRecord,
        state: str,
        *,
        finish_reason: str | None = None,
        error: LlorchError | None = None,
        tokens_in: int | None = None,
        tokens_out: int = 0,
    ) -> None:
        """End a task at once, its trace written on the spot (for callers that cannot wait:
        admission's drop-lru victim, a cancel, a deadline passed in the queue). On a store
        that offloads, the ending is decided now and written by a task (see :meth:`settled`)."""
        ending = self._decide(record, state, finish_reason, error, tokens_in, tokens_out)
        if self._db.offloads:
            self._own(self._closing, self._end_off_loop(ending), ending)
            return
        trace: ArtifactInsert | None = None
        prepared = self._prepare_trace(ending)
        if prepared is not None:
            try:
                self._store_body(prepared)
                trace = self._row_of(prepared)
            except (LlorchError, OSError) as exc:
                _trace_missing(ending, exc)
        self._close(ending, trace)

    async def end(
        self,
        record: TaskRecord,
        state: str,
        *,
        finish_reason: str | None = None,
        error: LlorchError | None = None,
        tokens_in: int | None = None,
        tokens_out: int = 0,
    ) -> None:
        """End a task like :meth:`end_now`, its trace's file written off the event loop (its
        fsyncs take milliseconds). The terminal frame still follows the stored trace."""
        ending = self._decide(record, state, finish_reason, error, tokens_in, tokens_out)
        trace: ArtifactInsert | None = None
        prepared = self._prepare_trace(ending)
        if prepared is not None:
            write = asyncio.ensure_future(asyncio.to_thread(self._store_body, prepared))
            try:
                await asyncio.shield(write)
                trace = self._row_of(prepared)
            except asyncio.CancelledError:
                # Shut down mid-write: the task still ends, now, without its trace.
                self._close(ending, None)
                raise
            except (LlorchError, OSError) as exc:
                _trace_missing(ending, exc)
            except Exception as exc:  # a bug: the task still ends, without its trace
                log.exception("task %s: storing its trace failed unexpectedly", record.task_id)
                _trace_missing(ending, exc)
        closing = self._close(ending, trace)
        if closing is not None:  # its commit in a thread: the run ends with it
            await asyncio.shield(closing)

    async def reconcile(
        self, row: TaskRow, why: str = "the server restarted while the task was in flight"
    ) -> None:
        """After a restart, end a task that was running (or whose end was never committed):
        failed with a retriable WORKER_RESET, charged for what its last progress checkpoint
        recorded (its prompt estimate once it had started, its tokens, its time). In cluster
        mode also a task of an instance whose heartbeat expired (ORCH-STATE-0035)."""
        error = WorkerReset(why)
        body = json.loads(row.request_json)
        started = row.started_ms is not None
        tokens_in = (
            estimate_tokens_in(completion_request(row.task_id, body, row.correlation_id))
            if started
            else 0
        )
        tokens_out = row.tokens_out
        run_ms = max(0, (row.progress_ms or row.started_ms or 0) - (row.started_ms or 0))
        cost = self._settings.pricing.price_for(row.model).cost(tokens_in, tokens_out)
        # Its events died with the process; the terminal frame gets an id above any a client
        # can have seen (started, one token and at most one metrics frame per token), so a
        # Last-Event-ID resume still reaches it.
        values: dict[str, Any] = {
            "state": FAILED,
            "ended_ms": self._clock.now_ms(),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "cost": cost,
            "terminal_event_id": 2 * int(body.get("max_tokens", 0)) + 2,
            **error_columns(error),
        }
        used = Reservation(tokens=tokens_in + tokens_out, time_ms=run_ms, cost=cost)
        settled = self._sessions.settle(row.session_id, row.task_id, used)
        try:
            await self._db.run(
                self._db.finish_task,
                row.task_id,
                values,
                row.session_id,
                settled.values,
                used=settled.used,
            )
        except EndedElsewhere:
            return  # another instance ended it first: it ended once
        log.info(
            "task ended by the restart",
            extra={
                "event": "task",
                "task_id": row.task_id,
                "state": FAILED,
                "pool_id": row.pool_id,
                "correlation_id": row.correlation_id,
                "code": error.code,
                "tokens_out": tokens_out,
            },
        )

    async def quarantine(self, row: TaskRow, exc: Exception) -> None:
        """A task row the restart cannot read (a malformed request, a missing field): it is
        ended failed WORKER_RESET, uncharged, and start-up goes on (ORCH-STATE-0006)."""
        log.error(
            "task %s: its row cannot be restored (%s); it is ended failed",
            row.task_id,
            exc,
            extra={"event": "task_quarantined", "task_id": row.task_id},
        )
        error = WorkerReset("the task's stored request could not be read after a restart")
        values: dict[str, Any] = {
            "state": FAILED,
            "ended_ms": self._clock.now_ms(),
            "terminal_event_id": row.terminal_event_id or 0,
            **error_columns(error),
        }
        if self._db.holds_reservations:  # its reservation is released there, nothing charged
            nothing = Reservation(0, 0, 0.0)
            db = self._db
            with contextlib.suppress(EndedElsewhere):  # ended elsewhere first: it ended once
                await db.run(db.finish_task, row.task_id, values, row.session_id, {}, used=nothing)
            return
        await self._db.run(self._db.update_task, row.task_id, **values)

    async def settled(self) -> None:
        """Return once the ends whose first commit was under way at the call are committed
        and published, or refused and left to their retry (Storage.offloads; at once
        otherwise)."""
        if self._closing:
            await asyncio.shield(asyncio.gather(*self._closing, return_exceptions=True))

    async def stop(self) -> None:
        """Give up the ends still waiting for storage to take them: their rows stay open, and
        the next start reconciles them. Ends already committed get their frame once durable
        (an fsync: a few milliseconds), unless syncing fails for ``_STOP_SYNC_S``."""
        await self.settled()
        for retry in list(self._retries):
            retry.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
        try:
            async with asyncio.timeout(_STOP_SYNC_S):
                await self._db.durable()
        except (TimeoutError, StorageError) as exc:
            log.error("stopping with ends not durable yet (the next start reconciles): %s", exc)

    # -- steps ------------------------------------------------------------------------------

    def _decide(
        self,
        record: TaskRecord,
        state: str,
        finish_reason: str | None,
        error: LlorchError | None,
        tokens_in: int | None,
        tokens_out: int,
    ) -> Ending:
        return conclude(
            record,
            state,
            clock=self._clock,
            pricing=self._settings.pricing,
            finish_reason=finish_reason,
            error=error,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )

    def _close(self, ending: Ending, trace: ArtifactInsert | None) -> asyncio.Task[None] | None:
        """Commit the end, then publish it once the commit is durable; when storage refuses
        the commit, retry it until it commits. A store that offloads commits in a task: it is
        returned."""
        if self._db.offloads:
            return self._own(self._closing, self._close_off_loop(ending, trace), ending)
        told = self._commit(ending, trace)
        if told is not None:
            self._db.when_durable(lambda: self._publish(told))
        else:
            self._own(self._retries, self._retry_commit(ending, trace), ending)
        return None

    async def _end_off_loop(self, ending: Ending) -> None:
        """:meth:`end_now`'s trace and commit through Storage.run."""
        trace: ArtifactInsert | None = None
        prepared = self._prepare_trace(ending)
        if prepared is not None:
            try:
                await self._db.run(self._store_body, prepared)
                trace = self._row_of(prepared)
            except (LlorchError, OSError) as exc:
                _trace_missing(ending, exc)
        await self._close_off_loop(ending, trace)

    async def _close_off_loop(self, ending: Ending, trace: ArtifactInsert | None) -> None:
        told = await self._commit_async(ending, trace)
        if told is not None:
            self._db.when_durable(lambda: self._publish(told))
        else:
            self._own(self._retries, self._retry_commit(ending, trace), ending)

    def _own(
        self, tasks: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None], ending: Ending
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=f"end:{ending.record.task_id}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def _commit(self, ending: Ending, trace: ArtifactInsert | None) -> Ending | None:
        """Release the reservation and commit usage, the final row and the trace's row in one
        transaction; the ending to tell (the stored one when another instance ended the task
        first, ORCH-STATE-0038), or None (the reservation held again) when storage refused
        it."""
        settled, finish = self._finishing(ending, trace)
        try:
            overrun = self._db.finish_task(*finish.args, **finish.keywords)
        except (EndedElsewhere, StorageError) as exc:
            return self._not_committed(ending, exc)
        self._record_overrun(ending.record, settled.overrun or overrun)
        return ending

    async def _commit_async(self, ending: Ending, trace: ArtifactInsert | None) -> Ending | None:
        """:meth:`_commit`, its transaction through Storage.run."""
        settled, finish = self._finishing(ending, trace)
        try:
            overrun = await self._db.run(finish)
        except (EndedElsewhere, StorageError) as exc:
            return self._not_committed(ending, exc)
        self._record_overrun(ending.record, settled.overrun or overrun)
        return ending

    def _not_committed(self, ending: Ending, exc: EndedElsewhere | StorageError) -> Ending | None:
        """The stored ending when another instance ended the task first; None (the
        reservation held again) when storage refused the commit."""
        if isinstance(exc, EndedElsewhere):
            return _ended_elsewhere(ending, exc.row)
        self._refused(ending, exc)
        return None

    def _finishing(
        self, ending: Ending, trace: ArtifactInsert | None
    ) -> tuple[Settled, functools.partial[Reservation | None]]:
        """The reservation released (in memory) and the usage charged; the storage call
        that commits them with the final row and the trace's row."""
        record = ending.record
        values = ending.values | {"trace_artifact_id": None if trace is None else trace.artifact_id}
        used = Reservation(
            tokens=ending.tokens_in + ending.tokens_out, time_ms=ending.run_ms, cost=ending.cost
        )
        settled = self._sessions.settle(record.session_id, record.task_id, used)
        finish = functools.partial(
            self._db.finish_task,
            record.task_id,
            values,
            record.session_id,
            settled.values,
            trace=trace,
            used=settled.used,
        )
        return settled, finish

    def _refused(self, ending: Ending, exc: StorageError) -> None:
        record = ending.record
        self._sessions.reserve(record.session_id, record.task_id, record.reservation)
        log.error(
            "could not record the end of task %s (retrying until storage takes it): %s",
            record.task_id,
            exc,
            extra={"event": "task_end_deferred", "task_id": record.task_id},
        )

    async def _retry_commit(self, ending: Ending, trace: ArtifactInsert | None) -> None:
        """Try the refused commit again, backing off, until storage takes it; then tell the
        end once it is durable."""
        delay = _RETRY_FIRST_S
        while True:
            await asyncio.sleep(delay)
            if (told := await self._commit_async(ending, trace)) is not None:
                break
            delay = min(2 * delay, _RETRY_MAX_S)
        log.info(
            "the end of task %s is recorded",
            ending.record.task_id,
            extra={"event": "task_end_recorded", "task_id": ending.record.task_id},
        )
        self._db.when_durable(lambda: self._publish(told))

    def _publish(self, ending: Ending) -> None:
        """The end is durable: the terminal frame, the live task forgotten, metrics and log."""
        record, state, error = ending.record, ending.state, ending.error
        record.move_to(state)
        record.events.publish(*ending.terminal)
        self._registry.retire(record)
        self._record_end(ending)
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
                "outcome": ending.finish_reason or (error.code if error else None),
                "code": error.code if error else None,
            },
        )

    # -- the trace --------------------------------------------------------------------------

    def _prepare_trace(self, ending: Ending) -> Prepared | None:
        """The task's trace artifact, checked and hashed (None without an artifact store, or
        when it cannot be prepared: the task ends without it)."""
        if self._artifacts is None:
            return None
        record = ending.record
        pool = self._registry.pools.get(record.pool_id)
        replica = None
        if pool is not None and record.replica_id is not None:
            replica = next((r for r in pool.replicas if r.id == record.replica_id), None)
        try:
            return self._artifacts.prepare(
                kind="trace",
                content=trace_document(ending, replica.engine if replica else None),
                tags=("task-trace", ending.state),
                task_id=record.task_id,
                owner=record.row.owner,
            )
        except LlorchError as exc:
            _trace_missing(ending, exc)
            return None

    def _store_body(self, prepared: Prepared) -> None:
        assert self._artifacts is not None
        self._artifacts.write(prepared)

    def _row_of(self, prepared: Prepared) -> ArtifactInsert:
        assert self._artifacts is not None
        return self._artifacts.row(prepared)

    # -- metrics and logs -------------------------------------------------------------------

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

    def _record_end(self, ending: Ending) -> None:
        record, error = ending.record, ending.error
        pool = self._registry.pools.get(record.pool_id)
        if pool is None:
            return
        m, pool_id, model = pool.metrics, pool.id, record.request.model
        m.inc("llorch_tasks_finished_total", pool_id=pool_id, outcome=ending.state)
        m.inc("llorch_tokens_in_total", ending.tokens_in, pool_id=pool_id, model=model)
        m.inc("llorch_tokens_out_total", ending.tokens_out, pool_id=pool_id, model=model)
        if isinstance(error, EngineError):
            m.inc(
                "llorch_engine_errors_total",
                pool_id=pool_id,
                replica_id=record.replica_id or "none",
                code=error.code,
            )
        if record.ttft_ms is not None:
            m.observe("llorch_decode_seconds", ending.decode_ms / 1000, pool_id=pool_id)


def replay_from_row(row: TaskRow) -> EventStream:
    """A stream for a task whose events are no longer in memory: only its terminal frame, under
    its original id (earlier ids are gone: a client sees the gap)."""
    stream = EventStream(first_seq=row.terminal_event_id or 0)
    if row.state not in TERMINAL_STATES:
        # Its end is not committed yet (storage refused it, and the retry waits), or the
        # process that ran it died: no terminal state can be told yet.
        stream.publish(
            "error",
            {"code": "WORKER_RESET", "message": "task events were lost", "retriable": True},
        )
    else:
        stream.publish(*terminal_frame(asdict(row)))
    return stream


def _ended_elsewhere(ending: Ending, row: TaskRow) -> Ending:
    """The ending as another instance recorded it, to tell instead (ORCH-STATE-0038): its
    state, usage and terminal frame."""
    task_id = ending.record.task_id
    log.warning(
        "task %s ended on another instance first (%s); its stored end is told",
        task_id,
        row.state,
        extra={"event": "task_ended_elsewhere", "task_id": task_id},
    )
    return replace(
        ending,
        state=row.state,
        finish_reason=row.finish_reason,
        values=asdict(row),
        terminal=terminal_frame(asdict(row)),
        tokens_in=row.tokens_in,
        tokens_out=row.tokens_out,
        cost=row.cost,
    )


def _trace_missing(ending: Ending, exc: Exception) -> None:
    # The task still ends with its terminal frame and its final row; the store logged and
    # counted a failed write, and the task's line says its trace is missing.
    task_id = ending.record.task_id
    log.error(
        "could not store the trace of task %s: %s",
        task_id,
        exc,
        extra={"event": "trace_missing", "task_id": task_id},
    )
