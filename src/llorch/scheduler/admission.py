"""Admission: the checks a task passes before it is queued, in order, and its persistence.

Model and placement → pool; limits of the model; session (exists, TTL, turns); budgets (the
worst case the task may spend); deadline (predicted wait + expected run time, from measured
throughput); queue capacity and policy. Only then is the task written to the database, and only
after that is it queued and answered 202.

On the embedded store (:meth:`Admitter.admit`) everything is synchronous: no other request can
interleave between the checks and the enqueue. In cluster mode (:meth:`Admitter.admit_shared`)
the database reads and the admission's one transaction run in storage's worker threads, the
event loop serving meanwhile (ORCH-STATE-0060): the checks that must be exact across instances
(capacity, budgets, position and deadline) are made inside that transaction, and the task's
record is registered here on the loop once it has committed, even if the request is gone by
then.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llorch.clock import Clock
from llorch.config import Settings
from llorch.engines.base import (
    CHAT_FEATURES,
    CompletionRequest,
    bound_tokens_in,
    estimate_tokens_in,
)
from llorch.errors import (
    DeadlineUnmet,
    InvalidParams,
    LlorchError,
    PoolUnavailable,
    PoolUnready,
    QueueFull,
    QueueFullDropLru,
    TaskExists,
)
from llorch.persistence import SessionRow, Storage, TaskRow
from llorch.scheduler.caller import ANYONE, Caller
from llorch.scheduler.cluster_queue import ClusterQueue
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.queue import Priority
from llorch.scheduler.registry import Registry
from llorch.scheduler.settle import Settlement
from llorch.scheduler.task import FAILED, QUEUED, TaskRecord, completion_request
from llorch.sessions import Reservation, SessionService
from llorch.sessions.service import Remaining, new_id

log = logging.getLogger("llorch.tasks")

POOL_RETRY_MS = 2000  # advice while a pool has no ready replica: two health probes
_READ = object()  # revive: read the session's replica from storage


@dataclass(frozen=True)
class Admission:
    task_id: str
    session_id: str
    pool_id: str
    state: str
    queue_position: int
    predicted_start_ms: int
    backoff_ms: int
    remaining: Remaining


@dataclass
class _Draft:
    """A task being admitted, as the steps of :meth:`Admitter.admit` fill it in."""

    body: Mapping[str, Any]
    request: CompletionRequest
    pool: PoolRuntime
    session: SessionRow
    new_session: bool
    want: Reservation
    victim: TaskRecord | None = None
    flow: str = ""
    position: int = 0
    wait_s: float = 0.0

    @property
    def priority(self) -> Priority:
        priority: Priority = self.body.get("priority", "interactive")
        return priority


def _check_limits(pool: PoolRuntime, request: CompletionRequest) -> None:
    """The model's limits: max_tokens, and the prompt with it within the context."""
    if request.max_tokens > pool.settings.max_tokens_out:
        raise InvalidParams(
            f"max_tokens {request.max_tokens} is above the limit of model {request.model} "
            f"({pool.settings.max_tokens_out})",
            pool_id=pool.id,
        )
    tokens_in = estimate_tokens_in(request)
    if tokens_in + request.max_tokens > pool.settings.max_context:
        raise InvalidParams(
            f"prompt (~{tokens_in} tokens) plus max_tokens exceeds the context of model "
            f"{request.model} ({pool.settings.max_context})",
            pool_id=pool.id,
        )


def _check_deadline(draft: _Draft, run_s: float | None = None) -> None:
    """DeadlineUnmet when the predicted wait and run (``run_s``: measured now, when not
    given) end after the task's deadline."""
    deadline_ms = draft.body.get("deadline_ms")
    if deadline_ms is None:
        return
    if run_s is None:
        run_s = draft.pool.meter.expected_run_s(draft.request.max_tokens)
    if (draft.wait_s + run_s) * 1000 > deadline_ms:
        raise DeadlineUnmet(
            f"predicted end in {math.ceil((draft.wait_s + run_s) * 1000)} ms "
            f"({math.ceil(draft.wait_s * 1000)} ms queued, {math.ceil(run_s * 1000)} ms running) "
            f"is after the deadline of {deadline_ms} ms",
            pool_id=draft.pool.id,
        )


def _answer(draft: _Draft, record: TaskRecord, remaining: Remaining) -> Admission:
    wait_ms = math.ceil(draft.wait_s * 1000)
    return Admission(
        task_id=record.task_id,
        session_id=record.session_id,
        pool_id=draft.pool.id,
        state=QUEUED,
        queue_position=draft.position,
        predicted_start_ms=record.row.created_ms + wait_ms,
        backoff_ms=wait_ms,
        remaining=remaining,
    )


def _log_unheard(done: asyncio.Future[TaskRecord]) -> None:
    if done.cancelled() or done.exception() is None:
        return
    log.info("an admission ended after its request had gone: %s", done.exception())


def _full(pool: PoolRuntime, exc: QueueFull) -> QueueFull:
    """The refusal of a full queue, with its pool and retry advice."""
    return type(exc)(
        f"queue of pool {pool.id} is full ({pool.settings.queue.capacity} tasks)",
        retry_after_ms=pool.retry_after()[1],
        policy_label=exc.policy_label,
        pool_id=pool.id,
    )


def _log_queued(pool: PoolRuntime, record: TaskRecord, position: int) -> None:
    pool.metrics.inc("llorch_tasks_admitted_total", pool_id=pool.id, priority=record.priority)
    log.info(
        "task queued",
        extra={
            "event": "task",
            "task_id": record.task_id,
            "state": QUEUED,
            "pool_id": pool.id,
            "session_id": record.session_id,
            "queue_position": position,
            "correlation_id": record.row.correlation_id,
        },
    )


def request_digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _require_utf8(body: Mapping[str, Any]) -> None:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParams("request contains text that is not valid UTF-8") from exc


class Admitter:
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
        self._sessions = sessions
        self._settings = settings
        self._clock = clock
        self._settlement = settlement
        self.cluster: ClusterQueue | None = None  # cluster mode: the shared queue
        # Cluster admissions whose transaction is under way (each finishes on its own).
        self._admitting: set[asyncio.Future[TaskRecord]] = set()

    def admit(
        self, body: Mapping[str, Any], correlation_id: str, caller: Caller = ANYONE
    ) -> Admission:
        """Admit a task on the embedded store: each step may refuse it; nothing is written
        before the last check, and nothing else runs on the loop meanwhile."""
        if self.cluster is not None:
            raise RuntimeError("cluster mode admits through admit_shared")
        _require_utf8(body)
        digest = request_digest(body)
        task_id = body.get("task_id")
        if task_id is not None and (row := self._db.get_task(task_id)) is not None:
            remaining = self._sessions.remaining_for(row.session_id)
            return self._replay(row, digest, caller, self._local_position(row), remaining)
        request, pool = self._routed(task_id, body, correlation_id)
        session_id: str | None = body.get("session_id")
        session = None
        if session_id is not None:
            session = self._sessions.live_row(session_id, visible_to=caller.visible_to)
        draft = self._session_and_budget(pool, body, request, caller, session)
        self._place_in_queue(draft, caller)
        _check_deadline(draft)
        record = self._persist(draft, digest, caller)
        self._enqueue(draft, record)
        return _answer(draft, record, self._sessions.admitted(draft.session))

    async def admit_shared(
        self, cluster: ClusterQueue, body: Mapping[str, Any], correlation_id: str, caller: Caller
    ) -> Admission:
        """Admit a task in cluster mode: the steps of :meth:`admit`, the database's reads and
        the admission's transaction in storage's worker threads, the loop free meanwhile."""
        _require_utf8(body)
        digest = request_digest(body)
        task_id = body.get("task_id")
        if task_id is not None and (row := await self._db.run(self._db.get_task, task_id)):
            live = self._registry.live.get(task_id)
            position = self._local_position(row)
            if live is None and row.state == QUEUED:
                position = await cluster.position(row) or 0
            remaining = await self._sessions.fetch_remaining(row.session_id)
            return self._replay(row, digest, caller, position, remaining)
        request, pool = self._routed(task_id, body, correlation_id)
        session_id: str | None = body.get("session_id")
        session = None
        if session_id is not None:
            session = await self._sessions.fetch_live_row(session_id, caller.visible_to)
        draft = self._session_and_budget(pool, body, request, caller, session)
        record = await self._admit_shared(cluster, draft, digest, caller)
        return _answer(draft, record, await self._sessions.fetch_remaining(record.session_id))

    # -- the steps, in order ----------------------------------------------------------------

    def _routed(
        self, task_id: str | None, body: Mapping[str, Any], correlation_id: str
    ) -> tuple[CompletionRequest, PoolRuntime]:
        """The engine request and the pool it goes to, within that pool's limits."""
        request = completion_request(task_id or new_id("t"), body, correlation_id)
        pool = self._route(request, body.get("placement") or {})
        _check_limits(pool, request)
        return request, pool

    def _session_and_budget(
        self,
        pool: PoolRuntime,
        body: Mapping[str, Any],
        request: CompletionRequest,
        caller: Caller,
        session: SessionRow | None,
    ) -> _Draft:
        """The task's session (a new one, or ``session``: the caller's live one, read) after
        one more turn, and the worst case it reserves; BudgetExhausted when that does not fit."""
        new_session = session is None
        if session is None:
            session = self._sessions.new_row(owner=caller.owner, cap=caller.budgets)
        want = self._worst_case(pool, request)
        try:
            session = self._sessions.check_use(session, want)
        except LlorchError as exc:
            exc.retry_after_ms = pool.retry_after()[1]
            raise
        return _Draft(body, request, pool, session, new_session, want)

    def _place_in_queue(self, draft: _Draft, caller: Caller) -> None:
        """Its place in the queue: the victim a full drop-lru queue gives up for it (QueueFull
        when there is none), its flow, its position in dispatch order and its predicted wait."""
        pool, priority = draft.pool, draft.priority
        try:
            draft.victim = pool.queue.victim_for(priority)
        except QueueFull as exc:
            raise _full(pool, exc) from None
        draft.flow = pool.flow_for(caller.owner, draft.session.session_id, caller.headers)
        # A dropped victim ahead of it frees a place.
        draft.position = pool.queue.position_if_pushed(draft.flow, priority, draft.victim)
        draft.wait_s = pool.wait_s(draft.position)

    def _persist(self, draft: _Draft, digest: str, caller: Caller) -> TaskRecord:
        """Write the task and its session's turn in one transaction; its live record."""
        row = self._row(draft, digest, caller)
        self._db.admit_task(row, draft.session, new_session=draft.new_session)
        return self._draft_record(draft, row)  # SQLite: the reservation is held in memory

    def _row(self, draft: _Draft, digest: str, caller: Caller) -> TaskRow:
        body, request, session = draft.body, draft.request, draft.session
        return TaskRow(
            task_id=request.task_id,
            session_id=session.session_id,
            pool_id=draft.pool.id,
            model=request.model,
            priority=draft.priority,
            state=QUEUED,
            request_json=json.dumps(body, sort_keys=True, ensure_ascii=True),
            request_digest=digest,
            correlation_id=request.correlation_id,
            created_ms=self._clock.now_ms(),
            owner=caller.owner,
        )

    def _draft_record(self, draft: _Draft, row: TaskRow) -> TaskRecord:
        return self._record(
            row,
            draft.request,
            draft.pool,
            want=draft.want,
            affinity=draft.session.last_replica_id,
            deadline_ms=draft.body.get("deadline_ms"),
            max_wait_ms=draft.body.get("max_wait_ms"),
            flow=draft.flow,
            position=draft.position,
        )

    async def _admit_shared(
        self, cluster: ClusterQueue, draft: _Draft, digest: str, caller: Caller
    ) -> TaskRecord:
        """Cluster mode: capacity, victim, position and the deadline's check, and the task's
        write, in one transaction of the shared queue (ORCH-STATE-0030), in a worker thread;
        the task waits there, its record kept here for its stream. What follows the commit
        runs to its end on the loop even when the request is cancelled meanwhile."""
        pool = draft.pool
        draft.flow = pool.flow_for(caller.owner, draft.session.session_id, caller.headers)
        row = self._row(draft, digest, caller)
        # Read on the loop now: the check runs in the transaction's thread.
        wait_at, run_s = pool.wait_at(), pool.meter.expected_run_s(draft.request.max_tokens)

        def check(position: int) -> None:
            draft.position, draft.wait_s = position, wait_at(position)
            _check_deadline(draft, run_s)

        admitted = asyncio.ensure_future(self._commit_shared(cluster, draft, row, check))
        self._admitting.add(admitted)
        admitted.add_done_callback(self._admitting.discard)
        # Its refusal reaches the request through the shield; one the request left is logged.
        admitted.add_done_callback(_log_unheard)
        return await asyncio.shield(admitted)

    async def _commit_shared(
        self, cluster: ClusterQueue, draft: _Draft, row: TaskRow, check: Callable[[int], None]
    ) -> TaskRecord:
        pool = draft.pool
        try:
            victim = await cluster.admit(
                pool,
                row,
                draft.session,
                new_session=draft.new_session,
                flow=draft.flow,
                check=check,
                reservation=draft.want,
            )
        except QueueFull as exc:
            raise _full(pool, exc) from None
        except LlorchError as exc:  # the budgets, found spent by another instance meanwhile
            exc.retry_after_ms = exc.retry_after_ms or pool.retry_after()[1]
            raise
        record = self._draft_record(draft, row)
        self._sessions.reserve(record.session_id, record.task_id, draft.want)
        cluster.hold(record)
        if victim is not None:
            await cluster.drop(pool, victim)
        _log_queued(pool, record, draft.position)
        pool.wakeup.set()
        return record

    def _enqueue(self, draft: _Draft, record: TaskRecord) -> None:
        """Hold its reservation, end the victim it displaced, queue it and wake its pool."""
        pool, victim = draft.pool, draft.victim
        self._sessions.reserve(record.session_id, record.task_id, draft.want, draft.session)
        self._registry.add(record)
        if victim is not None:
            pool.queue.remove(victim, victim.priority)
            self._settlement.end_now(
                victim,
                FAILED,
                error=QueueFullDropLru(
                    f"dropped from the full queue of pool {pool.id} for a newer task",
                    policy_label="drop-lru",
                    pool_id=pool.id,
                ),
            )
        pool.queue.push(record, record.priority)
        pool.watch_wait(record)
        pool.record_queue()
        _log_queued(pool, record, draft.position)
        pool.wakeup.set()

    def _record(
        self,
        row: TaskRow,
        request: CompletionRequest,
        pool: PoolRuntime,
        *,
        want: Reservation,
        affinity: str | None,
        deadline_ms: int | None,
        max_wait_ms: int | None,
        flow: str,
        position: int,
    ) -> TaskRecord:
        """The live record of an admitted or restored task; its deadline and its wait limit
        count from its creation (a restored task has spent part of them already)."""
        loop_now, waited_ms = (
            asyncio.get_running_loop().time(),
            self._clock.now_ms() - row.created_ms,
        )
        deadline_at = None
        if deadline_ms is not None:
            deadline_at = loop_now + (deadline_ms - waited_ms) / 1000
        limits = [m for m in (pool.settings.queue.max_wait_ms, max_wait_ms) if m is not None]
        wait_until = loop_now + (min(limits) - waited_ms) / 1000 if limits else None
        return TaskRecord(
            row=row,
            request=request,
            priority=row.priority,  # type: ignore[arg-type]
            reservation=want,
            tokens_in_estimate=estimate_tokens_in(request),
            affinity_replica_id=affinity,
            deadline_at=deadline_at,
            wait_until=wait_until,
            flow=flow,
            queue_position_at_start=position,
        )

    def _worst_case(self, pool: PoolRuntime, request: CompletionRequest) -> Reservation:
        """What a task may spend at most: the reservation it holds until it ends. Its time is
        the typical run of ``max_tokens``, so a run may take longer: the session is charged no
        more than it has (:meth:`SessionService.settle`)."""
        price = self._settings.pricing.price_for(request.model)
        tokens_in = bound_tokens_in(request)
        return Reservation(
            tokens=tokens_in + request.max_tokens,
            time_ms=math.ceil(pool.meter.expected_run_s(request.max_tokens) * 1000),
            cost=price.cost(tokens_in, request.max_tokens),
        )

    def restore(self, row: TaskRow) -> bool:
        """Queue again a task that was accepted before a restart; False when its pool is gone.

        Capacity is not checked: the task was accepted once, and nothing accepted is dropped (a
        queue may hold more than a capacity lowered across the restart until it drains).
        """
        record = self.revive(row)
        if record is None:
            return False
        pool = self._registry.pools[row.pool_id]
        self._registry.add(record)
        pool.queue.push(record, record.priority)
        pool.watch_wait(record)
        pool.record_queue()
        pool.wakeup.set()
        return True

    def revive(self, row: TaskRow, *, affinity: str | object | None = _READ) -> TaskRecord | None:
        """The live record of an accepted task read back from its row, its reservation held
        again; None when its pool is gone. ``affinity``: its session's replica, read from
        storage here unless given (cluster mode gives it: no read on the loop)."""
        pool = self._registry.pools.get(row.pool_id)
        if pool is None:
            return None
        body = json.loads(row.request_json)
        request = completion_request(row.task_id, body, row.correlation_id)
        if affinity is _READ:
            session = self._sessions.live_row_or_none(row.session_id)
            affinity = session.last_replica_id if session else None
        want = self._worst_case(pool, request)
        record = self._record(
            row,
            request,
            pool,
            want=want,
            affinity=affinity if isinstance(affinity, str) else None,
            deadline_ms=body.get("deadline_ms"),
            max_wait_ms=body.get("max_wait_ms"),
            flow=pool.flow_for(row.owner, row.session_id, {}),
            position=len(pool.queue),
        )
        self._sessions.reserve(row.session_id, row.task_id, want)
        return record

    def _local_position(self, row: TaskRow) -> int:
        """The position of a task held here (0 when not queued here)."""
        record = self._registry.live.get(row.task_id)
        if record is None:
            return 0
        return self._registry.pools[row.pool_id].queue.position(record, record.priority) or 0

    def _replay(
        self, row: TaskRow, digest: str, caller: Caller, position: int, remaining: Remaining
    ) -> Admission:
        """The answer to a resubmitted task_id (its stored ``row``): the same task, or 409 for
        another body (or another key's task: its id is taken, and nothing else about it is
        told)."""
        task_id = row.task_id
        if row.request_digest != digest or not caller.can_see(row.owner):
            raise TaskExists(f"task {task_id} exists with another body")
        record = self._registry.live.get(task_id)
        pool = self._registry.pools[row.pool_id]
        state = row.state if record is None else record.state
        wait_ms = math.ceil(pool.wait_s(position) * 1000) if state == QUEUED else 0
        return Admission(
            task_id=task_id,
            session_id=row.session_id,
            pool_id=row.pool_id,
            state=state,
            queue_position=position,
            predicted_start_ms=(row.created_ms if state != QUEUED else self._clock.now_ms())
            + wait_ms,
            backoff_ms=wait_ms,
            remaining=remaining,
        )

    def _route(self, request: CompletionRequest, placement: Mapping[str, Any]) -> PoolRuntime:
        model = request.model
        serving = [p for p in self._registry.pools.values() if p.model == model]
        if not serving:
            known = sorted({p.model for p in self._registry.pools.values()})
            raise InvalidParams(f"unknown model {model!r}; this server serves {known}")
        pin = placement.get("pin_pool_id")
        if pin is not None:
            pinned = self._registry.pools.get(pin)
            if pinned is None or pinned.model != model:
                raise InvalidParams(f"pool {pin!r} does not serve model {model!r}")
            serving = [pinned]
        serving = _able(serving, request)
        prefer = list(placement.get("prefer_pools", []))
        avoid = set(placement.get("avoid_pools", []))

        def rank(pool: PoolRuntime) -> tuple[int, int, float, str]:
            preferred = prefer.index(pool.id) if pool.id in prefer else len(prefer)
            load = len(pool.queue) / pool.settings.queue.capacity
            return (pool.id in avoid, preferred, load, pool.id)

        open_pools = [p for p in serving if not p.draining]
        if not open_pools:
            raise PoolUnavailable(
                f"every pool serving {model!r} is draining",
                retry_after_ms=POOL_RETRY_MS,
                pool_id=serving[0].id,
            )
        ready = [p for p in open_pools if p.ready]
        if not ready:
            raise PoolUnready(
                f"no ready replica in pool {open_pools[0].id} for model {model!r}",
                retry_after_ms=POOL_RETRY_MS,
                pool_id=open_pools[0].id,
            )
        return min(ready, key=rank)


def _able(serving: list[PoolRuntime], request: CompletionRequest) -> list[PoolRuntime]:
    """The pools whose engine serves what the request needs (ORCH-ENG-0009), or a 400 naming
    the first field none of them serves."""
    needs = request.features
    if not needs:
        return serving
    if request.messages is None and needs & CHAT_FEATURES:
        chat_only = min(needs & CHAT_FEATURES)
        raise InvalidParams(f"'{chat_only}' is not served for a prompt, only for messages")
    able = [p for p in serving if needs <= p.features]
    if not able:
        engines = sorted({p.settings.engine for p in serving})
        missing = min(needs - frozenset.intersection(*(p.features for p in serving)))
        raise InvalidParams(
            f"'{missing}' is not served by the engine of any pool serving model "
            f"{request.model!r} ({', '.join(engines)})",
            pool_id=serving[0].id,
        )
    return able
