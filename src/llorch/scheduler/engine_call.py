"""One task's engine call: the relay of its chunks, retries before the first token, and the
circuit-breaker bookkeeping of the replicas it used.

Before the first token has been relayed, a retriable engine error is retried with exponential
backoff (tenacity), on another ready replica with a free slot when there is one, else on the
same replica while it still serves. Once a token has been relayed nothing is retried: the error
ends the task (the adapter has made it a ``WORKER_RESET`` or a ``DECODE_TIMEOUT``). Every failed
attempt counts against its replica's circuit breaker, except an engine's refusal (4xx) of the
request itself; a finished completion resets the count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from llorch.engines.base import Finish, Token
from llorch.errors import DeadlineUnmet, DecodeTimeout, EngineError, EngineRejected, EngineTimeout
from llorch.persistence import Database
from llorch.scheduler.pools import PoolRuntime, Replica
from llorch.scheduler.task import TaskRecord
from llorch.timers import Watchdog

log = logging.getLogger("llorch.dispatcher")


class EngineCall:
    """Runs ``record``'s completion, starting on ``replica`` (whose slot it already holds).

    ``replica`` is the replica holding the task's slot at every moment, the one to release when
    the call ends. ``on_token`` relays one token (the caller publishes it).
    """

    def __init__(
        self,
        pool: PoolRuntime,
        record: TaskRecord,
        replica: Replica,
        db: Database,
        on_token: Callable[[EngineCall, str], None],
    ) -> None:
        self.pool = pool
        self.record = record
        self.replica = replica
        self.started = asyncio.get_running_loop().time()
        self.first_token_at: float | None = None
        self.tokens_out = 0
        self._db = db
        self._on_token = on_token

    async def run(self) -> Finish:
        retry = self.pool.settings.retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry.attempts),
            wait=wait_exponential(
                multiplier=retry.backoff_ms / 1000, max=retry.max_backoff_ms / 1000
            ),
            retry=retry_if_exception(self._can_retry),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self._replace()
                try:
                    finish = await self._relay()
                except EngineError as exc:
                    self._failed(exc)
                    raise
                self.replica.breaker.record_success()
                self.pool.record_replicas()
                return finish
        raise AssertionError("the retry loop ended without a result")  # reraise=True: unreachable

    def _can_retry(self, exc: BaseException) -> bool:
        return (
            isinstance(exc, EngineError)
            and exc.retriable
            and self.tokens_out == 0
            and not self.record.cancel_requested
            and (self.replica.serving or self._other() is not None)
        )

    def _other(self) -> Replica | None:
        return self.pool.pick_replica(None, avoid=self.replica)

    def _replace(self) -> None:
        """Before a retry: move the task's slot to another serving replica when there is one."""
        other = self._other()
        if other is None:
            return  # _can_retry saw the current replica still serving
        previous, self.replica = self.replica, other
        previous.busy -= 1
        other.busy += 1
        record = self.record
        record.replica_id = other.id
        self._db.place_task(
            record.task_id, record.session_id, pool_id=self.pool.id, replica_id=other.id
        )
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
                if not isinstance(chunk, Token):
                    return chunk
                now = loop.time()
                if self.first_token_at is None:
                    self.first_token_at = now
                self._on_token(self, chunk.text)
                self.tokens_out += 1
                dog.move(now + idle_s if deadline is None else min(now + idle_s, deadline))
        except TimeoutError as exc:
            if deadline is not None and loop.time() >= deadline:
                raise DeadlineUnmet("the task's deadline passed while it ran") from exc
            engine = self.replica.engine.engine
            if self.tokens_out:
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
