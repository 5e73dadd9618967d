"""One task's run, end to end: its start, its engine call, and its end.

The dispatcher spawns :meth:`EngineCall.run` for a task it placed on a replica slot; from there
the call owns the task. Once an engine has accepted the request (the ``Accepted`` chunk: an
HTTP engine's 200 head) it records the start and publishes the ``started`` frame; it relays the
engine's tokens as ``token`` frames (and the pieces of its tool calls as ``tool_call`` frames),
with a ``metrics`` frame every few, releases the slot and hands the outcome to
:class:`~llorch.scheduler.settle.Settlement`.

An engine that refuses the request because it is busy (its own 429 or 503) has not started the
task: the call gives the slot back, the replica takes no new task for the engine's
``Retry-After`` (else ``retry.backoff_ms``), and the task goes back to the front of its flow in
the queue, to be placed again, at most ``retry.requeues`` times; after that the refusal ends it
(ORCH-ENG-0015). Nothing has been published for it, so its stream still has one ``started``.

Before the first token has been relayed, a retriable engine error is retried with exponential
backoff (tenacity), on another ready replica with a free slot when there is one, else on the
same replica while it still serves. Once a token has been relayed nothing is retried: the error
ends the task (the adapter has made it a ``WORKER_RESET`` or a ``DECODE_TIMEOUT``). Every failed
attempt counts against its replica's circuit breaker, except an engine's refusal (4xx) of the
request itself; a finished completion resets the count.

The first-token and idle limits, and the task's deadline, are enforced here, once, for every
engine; adapters keep only their transport's limits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from llorch.clock import Clock
from llorch.engines.base import Accepted, Finish, Token, ToolCallDelta
from llorch.errors import (
    DeadlineUnmet,
    DecodeTimeout,
    EngineError,
    EngineRejected,
    EngineStatusError,
    EngineTimeout,
    LlorchError,
    StorageUnavailable,
    WorkerReset,
)
from llorch.persistence import Storage, when_free
from llorch.scheduler.pools import PoolRuntime, Replica
from llorch.scheduler.settle import Settlement
from llorch.scheduler.task import CANCELED, FAILED, RUNNING, SUCCEEDED, TaskRecord
from llorch.sessions import SessionService
from llorch.timers import Watchdog

log = logging.getLogger("llorch.dispatcher")


class _Refused(Exception):
    """The engine said it is busy before it accepted the request: the task may go back."""

    def __init__(self, error: EngineStatusError) -> None:
        super().__init__(error.message)
        self.error = error


class _CanceledAtStart(Exception):
    """A cancel came before the engine accepted the request, or while its start was written."""


@dataclass(frozen=True)
class RunContext:
    """What every run needs beside its pool, replica and task."""

    db: Storage
    sessions: SessionService
    settlement: Settlement
    clock: Clock
    metrics_every_tokens: int


class EngineCall:
    """Runs ``record`` on ``pool``, starting on ``replica`` (whose slot it already holds).

    ``replica`` is the replica holding the task's slot at every moment, the one to release when
    the call ends.
    """

    def __init__(
        self, pool: PoolRuntime, record: TaskRecord, replica: Replica, ctx: RunContext
    ) -> None:
        self.pool = pool
        self.record = record
        self.replica = replica
        self.started = asyncio.get_running_loop().time()
        self.first_token_at: float | None = None
        self.accepted = False  # an engine took the request: the task has started
        self._ctx = ctx
        self._db = ctx.db

    async def run(self) -> None:
        """The task, from its start to its end; a cancel ends it ``canceled``."""
        record, settlement = self.record, self._ctx.settlement
        record.calling = True
        try:
            outcome = await self._attempt()
            if outcome is None:  # back in the queue: not ended, nothing to settle
                return
            state, how = outcome
        except asyncio.CancelledError:
            self._release()
            if not record.ending:  # else it was cancelled while its end was written: it ended
                self._end_stopped()
            if not record.cancel_requested and record.reset_why is None:
                raise
            return
        except Exception as exc:  # a bug: the task still ends, loudly
            log.exception("task %s failed unexpectedly", record.task_id)
            state, how = FAILED, {"error": LlorchError(f"internal error: {exc}")}
        self._release()
        try:
            await settlement.end(record, state, **how)
        except asyncio.CancelledError:
            if not record.cancel_requested:
                raise

    def _end_stopped(self) -> None:
        """End a task whose run was stopped: canceled, or WORKER_RESET when its instance
        stopped it for losing the database (ORCH-STATE-0037)."""
        record, settlement = self.record, self._ctx.settlement
        if record.reset_why is not None:
            error = WorkerReset(record.reset_why)
            settlement.end_now(record, FAILED, error=error, tokens_out=record.tokens_out)
            return
        settlement.end_now(record, CANCELED, finish_reason="canceled", tokens_out=record.tokens_out)

    async def _attempt(self) -> tuple[str, dict[str, Any]] | None:
        """Call the task's engine (which starts it): the state it ends in, and how; None when
        it went back to the queue."""
        record = self.record
        if record.cancel_requested:  # canceled between dispatch and this first step
            return CANCELED, {"finish_reason": "canceled"}
        record.replica_id = self.replica.id
        try:
            finish = await self._call()
        except _CanceledAtStart:
            return CANCELED, {"finish_reason": "canceled"}
        except _Refused as refused:
            if record.requeues < self.pool.settings.retry.requeues and not record.cancel_requested:
                self._send_back(refused.error)
                return None
            self.replica.last_error = refused.error.message
            return FAILED, {"error": refused.error, "tokens_out": record.tokens_out}
        except (EngineError, DeadlineUnmet) as exc:
            self.replica.last_error = exc.message
            return FAILED, {"error": exc, "tokens_out": record.tokens_out}
        record.tokens_cached = finish.tokens_cached
        return SUCCEEDED, {
            "finish_reason": finish.finish_reason,
            "tokens_in": finish.tokens_in,
            "tokens_out": finish.tokens_out,
        }

    def _release(self) -> None:
        """Free the slot and record the run in the pool's meter, before the end is written:
        a queued task may take the slot meanwhile."""
        pool, record = self.pool, self.record
        self.replica.busy -= 1
        pool.record_replicas()
        ended = asyncio.get_running_loop().time()
        first = self.first_token_at
        pool.meter.record(
            service_s=ended - self.started,
            ttft_s=None if first is None else first - self.started,
            tokens=record.tokens_out,
            decode_s=0.0 if first is None else ended - first,
        )
        pool.wakeup.set()

    def _send_back(self, error: EngineStatusError) -> None:
        """The engine refused the task for being busy: its slot back, the task to the front of
        its flow in the queue (its reservation kept), the replica resting meanwhile."""
        pool, record, replica = self.pool, self.record, self.replica
        replica.last_error = error.message
        replica.busy -= 1
        pool.rest(replica, error.retry_after_ms)
        record.requeues += 1
        record.runner = None
        record.calling = False
        record.replica_id = None
        pool.requeue(record)
        pool.record_replicas()
        log.info(
            "task sent back to the queue: its engine was busy",
            extra={
                "event": "task",
                "task_id": record.task_id,
                "pool_id": pool.id,
                "replica_id": replica.id,
                "requeues": record.requeues,
                "correlation_id": record.row.correlation_id,
            },
        )

    async def _accept(self) -> None:
        """The engine took the request: the task starts (once, whatever attempt it is)."""
        if self.accepted:
            return
        if self.record.cancel_requested:
            raise _CanceledAtStart
        self.accepted = True
        await self._start()
        if self.record.cancel_requested:  # canceled while its start was written
            raise _CanceledAtStart

    async def _start(self) -> None:
        pool, replica, record = self.pool, self.replica, self.record
        now = self._ctx.clock.now_ms()
        record.check_move(RUNNING)
        place = functools.partial(
            self._db.place_task,
            record.task_id,
            record.session_id,
            pool_id=pool.id,
            replica_id=replica.id,
            state=RUNNING,
            started_ms=now,
        )
        await _until_recorded(self._db, place, record.task_id)
        record.move_to(RUNNING)
        record.replica_id = replica.id
        record.started_ms = now
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

    def _publish_tokens(self, outputs: Iterable[Token | ToolCallDelta]) -> None:
        """Publish the next tokens, or pieces of a tool call (ORCH-DATA-0034), each of which
        counts as one (the first one also sets the task's TTFT), and every
        ``metrics_every_tokens`` tokens a metrics frame."""
        record = self.record
        if record.tokens_out == 0:
            self._first_token()
        publish, every = record.events.publish, self._ctx.metrics_every_tokens
        for output in outputs:
            i = record.tokens_out
            if isinstance(output, Token):
                publish("token", _token_frame(output, i))
            else:
                publish("tool_call", _tool_call_frame(output, i))
            record.tokens_out = i = i + 1
            if i % every == 0:
                self._publish_metrics()

    def _first_token(self) -> None:
        pool = self.pool
        assert self.first_token_at is not None
        ttft_s = self.first_token_at - self.started
        self.record.ttft_ms = round(ttft_s * 1000)
        pool.metrics.observe(
            "llorch_ttft_seconds", ttft_s, pool_id=pool.id, engine=self.replica.engine.engine
        )

    def _publish_metrics(self) -> None:
        pool, record = self.pool, self.record
        assert self.first_token_at is not None
        elapsed = asyncio.get_running_loop().time() - self.first_token_at
        try:
            left = self._ctx.sessions.stream_remaining(record.session_id)
        except StorageUnavailable:
            return  # tokens go on; a later metrics frame carries the budgets (ORCH-STATE-0010)
        if left is None:
            return  # the budgets are being read off the loop: a later frame carries them
        tokens_out = record.tokens_out
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

    # -- the engine call --------------------------------------------------------------------

    async def _call(self) -> Finish:
        """The engine call, tried again (on another replica when one is free) while it fails
        retriably before its first token, up to ``retry.attempts`` in all."""
        retry = self.pool.settings.retry
        try:
            return await self._try()  # the common case, without the retry machinery's cost
        except EngineError as exc:
            if retry.attempts <= 1 or not self._can_retry(exc):
                raise
        # The waits before the second, third, ... attempt: backoff, twice that, ... up to the max.
        backoff_s, max_s = retry.backoff_ms / 1000, retry.max_backoff_ms / 1000
        await asyncio.sleep(min(backoff_s, max_s))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry.attempts - 1),
            wait=wait_exponential(multiplier=2 * backoff_s, max=max_s),
            retry=retry_if_exception(self._can_retry),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._replace()
                return await self._try()
        raise AssertionError("the retry loop ended without a result")  # reraise=True: unreachable

    async def _try(self) -> Finish:
        """One attempt of the engine call, on ``self.replica``."""
        try:
            finish = await self._relay()
        except EngineError as exc:
            self._failed(exc)
            if isinstance(exc, EngineStatusError) and _busy(exc) and not self.accepted:
                raise _Refused(exc) from exc
            raise
        self.replica.breaker.record_success()
        self.pool.record_replicas()
        return finish

    def _can_retry(self, exc: BaseException) -> bool:
        return (
            isinstance(exc, EngineError)
            and exc.retriable
            and self.record.tokens_out == 0
            and not self.record.cancel_requested
            and (self.replica.serving or self._other() is not None)
        )

    def _other(self) -> Replica | None:
        return self.pool.pick_replica(None, avoid=self.replica)

    async def _replace(self) -> None:
        """Before a retry: move the task's slot to another serving replica when there is one."""
        other = self._other()
        if other is None:
            return  # _can_retry saw the current replica still serving
        record = self.record
        if self.pool.move_slot is not None and not await self.pool.move_slot(record, other):
            return  # its slots are all leased by the instances: retried where it is
        place = functools.partial(
            self._db.place_task,
            record.task_id,
            record.session_id,
            pool_id=self.pool.id,
            replica_id=other.id,
        )
        other.busy += 1  # held while the write waits: no other task takes the slot meanwhile
        try:
            await when_free(self._db, place)
        except BaseException:
            other.busy -= 1
            raise
        previous, self.replica = self.replica, other
        previous.busy -= 1
        record.replica_id = other.id
        self.pool.record_replicas()
        self.pool.wakeup.set()  # the slot it left may take a queued task
        log.info(
            "task moved to another replica before its first token",
            extra={
                "event": "task",
                "task_id": record.task_id,
                "pool_id": self.pool.id,
                "replica_id": other.id,
                "correlation_id": record.row.correlation_id,
            },
        )

    def _failed(self, exc: EngineError) -> None:
        replica = self.replica
        replica.last_error = exc.message
        if isinstance(exc, EngineRejected):
            return  # the request was refused, the replica is fine
        if _busy(exc):
            return  # busy, not broken: its circuit stays closed (ORCH-ENG-0013)
        was = replica.breaker.state
        replica.breaker.record_failure()
        if replica.breaker.state != was:
            log.warning(
                "replica %s: circuit %s after %d consecutive failures (%s)",
                replica.id,
                replica.breaker.state,
                replica.breaker.consecutive_failures,
                exc.message,
            )
        self.pool.record_state()
        self.pool.record_replicas()

    async def _relay(self) -> Finish:
        """One attempt on ``self.replica``: relay its tokens, return its ``Finish``.

        The dispatcher's own limits apply to every engine: no first token within
        ``timeouts.first_token_ms`` of the attempt, no chunk for ``decode_timeout_ms`` after it,
        or the task's deadline.
        """
        loop = asyncio.get_running_loop()
        settings = self.pool.settings
        idle_s = settings.decode_timeout_ms / 1000
        deadline = self.record.deadline_at
        first_token_by = loop.time() + settings.timeouts.first_token_ms / 1000
        chunks = self.replica.engine.stream(self.record.request)
        # One watchdog for the whole relay: moving the idle limit at every token costs no timer.
        dog = Watchdog()
        dog.move(first_token_by if deadline is None else min(first_token_by, deadline))
        try:
            while True:
                chunk = await dog.wait(anext(chunks, None))
                if chunk is None:
                    raise EngineError(
                        "engine stream ended without finishing",
                        engine=self.replica.engine.engine,
                    )
                if not self.accepted:  # an engine may skip Accepted: its first chunk says it
                    await self._accept()
                if isinstance(chunk, Accepted):
                    continue
                if isinstance(chunk, Finish):
                    return chunk
                now = loop.time()
                if self.first_token_at is None:
                    self.first_token_at = now
                self._publish_tokens(chunk if isinstance(chunk, list) else (chunk,))
                dog.move(now + idle_s if deadline is None else min(now + idle_s, deadline))
        except TimeoutError as exc:
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineUnmet("the task's deadline passed while it ran") from exc
            engine = self.replica.engine.engine
            if self.record.tokens_out:
                raise DecodeTimeout(
                    f"no output from {self.replica.id} for {settings.decode_timeout_ms} ms",
                    engine=engine,
                ) from exc
            raise EngineTimeout(
                f"no first token from {self.replica.id} within "
                f"{settings.timeouts.first_token_ms} ms",
                engine=engine,
            ) from exc
        finally:
            dog.close()
            await chunks.aclose()


def _token_frame(token: Token, i: int) -> dict[str, Any]:
    """A ``token`` frame's data (the contract's TokenEvent)."""
    data: dict[str, Any] = {"t": token.text, "i": i}
    if token.logprobs:
        data["lp"] = list(token.logprobs)
    return data


def _tool_call_frame(piece: ToolCallDelta, i: int) -> dict[str, Any]:
    """A ``tool_call`` frame's data (the contract's ToolCallEvent)."""
    data: dict[str, Any] = {"i": i, "index": piece.index}
    if piece.id is not None:
        data["id"] = piece.id
    if piece.name is not None:
        data["name"] = piece.name
    data["arguments"] = piece.arguments
    return data


def _busy(exc: EngineError) -> bool:
    """The engine's own 429 or 503: busy, or not serving yet; not a fault of the replica."""
    return isinstance(exc, EngineStatusError) and exc.overloaded


async def _until_recorded(db: Storage, write: Callable[[], None], task_id: str) -> None:
    """``write`` through :func:`when_free`; while the database is unavailable (unreachable, or
    busy past its budget), tried again at its advice: the task holds its slot and stays queued
    until its start is recorded, rather than failing for the database (ORCH-STATE-0010). A
    cancel ends the wait."""
    while True:
        try:
            await when_free(db, write)
            return
        except StorageUnavailable as exc:
            log.warning("the start of task %s waits for the database: %s", task_id, exc.message)
            await asyncio.sleep((exc.retry_after_ms or 1000) / 1000)
