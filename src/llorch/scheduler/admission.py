"""Admission: the checks a task passes before it is queued, in order, and its persistence.

Model and placement → pool; limits of the model; session (exists, TTL, turns); budgets (the
worst case the task may spend); deadline (predicted wait + expected run time, from measured
throughput); queue capacity and policy. Only then is the task written to the database, and only
after that is it queued and answered 202. Everything here is synchronous: no other request can
interleave between the checks and the enqueue.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llorch.clock import Clock
from llorch.config import Budget, Settings
from llorch.engines.base import ChatMessage, CompletionRequest
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
from llorch.persistence import Database, TaskRow
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.queue import Priority
from llorch.scheduler.registry import Registry
from llorch.scheduler.task import FAILED, QUEUED, TaskRecord
from llorch.sessions import Reservation, SessionService
from llorch.sessions.service import Remaining, new_id

log = logging.getLogger("llorch.tasks")

POOL_RETRY_MS = 2000  # advice while a pool has no ready replica: two health probes


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


@dataclass(frozen=True)
class Caller:
    """Who submits: the owner of the task (and of a session it opens), whose sessions and
    tasks it may use (``visible_to`` None: everyone's), and the budgets a session it opens
    cannot exceed."""

    owner: str | None = None
    visible_to: str | None = None
    budgets: Budget | None = None
    # The request's headers, for a pool whose flows are named by a header.
    headers: Mapping[str, str] = field(default_factory=dict)


ANYONE = Caller()

Finisher = Callable[..., None]


def request_digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _prompt_bytes(request: CompletionRequest) -> int:
    """The prompt's UTF-8 bytes, with 8 for the markers a chat template puts around a message."""
    if request.prompt is not None:
        return len(request.prompt.encode())
    return sum(len(m.content.encode()) + 8 for m in request.messages or ())


def estimate_tokens_in(request: CompletionRequest) -> int:
    """The typical prompt size (4 bytes a token): for context limits, and for the charge of a
    task that ends before its engine counts its prompt."""
    return max(1, math.ceil(_prompt_bytes(request) / 4))


def bound_tokens_in(request: CompletionRequest) -> int:
    """The most prompt tokens an engine can count, for reservations: a byte-level tokenizer
    (BPE over UTF-8 bytes, SentencePiece with byte fallback) makes at most a token a byte, and
    8 more cover the begin/end markers."""
    return _prompt_bytes(request) + 8


def _require_utf8(body: Mapping[str, Any]) -> None:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParams("request contains text that is not valid UTF-8") from exc


class Admitter:
    def __init__(
        self,
        registry: Registry,
        db: Database,
        sessions: SessionService,
        settings: Settings,
        clock: Clock,
        finish: Finisher,
    ) -> None:
        self._registry = registry
        self._db = db
        self._sessions = sessions
        self._settings = settings
        self._clock = clock
        self._finish = finish

    def admit(
        self, body: Mapping[str, Any], correlation_id: str, caller: Caller = ANYONE
    ) -> Admission:
        _require_utf8(body)
        digest = request_digest(body)
        task_id = body.get("task_id")
        if task_id is not None:
            replay = self._replay(task_id, digest, caller)
            if replay is not None:
                return replay
        else:
            task_id = new_id("t")
        request = _completion_request(task_id, body, correlation_id)
        priority: Priority = body.get("priority", "interactive")
        pool = self._route(request, body.get("placement") or {})
        tokens_in = estimate_tokens_in(request)
        if request.max_tokens > pool.settings.max_tokens_out:
            raise InvalidParams(
                f"max_tokens {request.max_tokens} is above the limit of model {request.model} "
                f"({pool.settings.max_tokens_out})",
                pool_id=pool.id,
            )
        if tokens_in + request.max_tokens > pool.settings.max_context:
            raise InvalidParams(
                f"prompt (~{tokens_in} tokens) plus max_tokens exceeds the context of model "
                f"{request.model} ({pool.settings.max_context})",
                pool_id=pool.id,
            )

        session_id: str | None = body.get("session_id")
        new_session = session_id is None
        session = (
            self._sessions.new_row(owner=caller.owner, cap=caller.budgets)
            if session_id is None
            else self._sessions.live_row(session_id, visible_to=caller.visible_to)
        )
        run_s = pool.meter.expected_run_s(request.max_tokens)
        want = self._worst_case(pool, request)
        try:
            session = self._sessions.check_use(session, want)
        except LlorchError as exc:
            exc.retry_after_ms = pool.retry_after()[1]
            raise

        try:
            victim = pool.queue.victim_for(priority)
        except QueueFull as exc:
            backoff_ms = pool.retry_after()[1]
            raise type(exc)(
                f"queue of pool {pool.id} is full ({pool.settings.queue.capacity} tasks)",
                retry_after_ms=backoff_ms,
                policy_label=exc.policy_label,
                pool_id=pool.id,
            ) from None
        # Position in dispatch order once queued (a dropped victim ahead of it frees a place).
        flow = pool.flow_for(caller.owner, session.session_id, caller.headers)
        position = pool.queue.position_if_pushed(flow, priority, victim)
        wait_s = pool.wait_s(position)
        if "deadline_ms" in body and (wait_s + run_s) * 1000 > body["deadline_ms"]:
            raise DeadlineUnmet(
                f"predicted end in {math.ceil((wait_s + run_s) * 1000)} ms "
                f"({math.ceil(wait_s * 1000)} ms queued, {math.ceil(run_s * 1000)} ms running) "
                f"is after the deadline of {body['deadline_ms']} ms",
                pool_id=pool.id,
            )

        now = self._clock.now_ms()
        row = TaskRow(
            task_id=task_id,
            session_id=session.session_id,
            pool_id=pool.id,
            model=request.model,
            priority=priority,
            state=QUEUED,
            request_json=json.dumps(body, sort_keys=True, ensure_ascii=True),
            request_digest=digest,
            correlation_id=correlation_id,
            created_ms=now,
            owner=caller.owner,
        )
        self._db.admit_task(row, session, new_session=new_session)

        loop = asyncio.get_running_loop()
        record = TaskRecord(
            row=row,
            request=request,
            priority=priority,
            reservation=want,
            tokens_in_estimate=tokens_in,
            affinity_replica_id=session.last_replica_id,
            deadline_at=loop.time() + body["deadline_ms"] / 1000 if "deadline_ms" in body else None,
            flow=flow,
            queue_position_at_start=position,
        )
        self._sessions.reserve(session.session_id, task_id, want)
        self._registry.add(record)
        if victim is not None:
            pool.queue.remove(victim, victim.priority)
            self._finish(
                victim,
                FAILED,
                error=QueueFullDropLru(
                    f"dropped from the full queue of pool {pool.id} for a newer task",
                    policy_label="drop-lru",
                    pool_id=pool.id,
                ),
            )
        pool.queue.push(record, priority)
        pool.record_queue()
        pool.metrics.inc("llorch_tasks_admitted_total", pool_id=pool.id, priority=priority)
        log.info(
            "task queued",
            extra={
                "event": "task",
                "task_id": task_id,
                "state": QUEUED,
                "pool_id": pool.id,
                "session_id": session.session_id,
                "queue_position": position,
                "correlation_id": correlation_id,
            },
        )
        pool.wakeup.set()
        return Admission(
            task_id=task_id,
            session_id=session.session_id,
            pool_id=pool.id,
            state=QUEUED,
            queue_position=position,
            predicted_start_ms=now + math.ceil(wait_s * 1000),
            backoff_ms=math.ceil(wait_s * 1000),
            remaining=self._sessions.remaining(session),
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
            cost=round(
                (tokens_in * price.input_per_1k + request.max_tokens * price.output_per_1k) / 1000,
                9,
            ),
        )

    def restore(self, row: TaskRow) -> bool:
        """Queue again a task that was accepted before a restart; False when its pool is gone.

        Capacity is not checked: the task was accepted once, and nothing accepted is dropped (a
        queue may hold more than a capacity lowered across the restart until it drains).
        """
        pool = self._registry.pools.get(row.pool_id)
        if pool is None:
            return False
        body = json.loads(row.request_json)
        request = _completion_request(row.task_id, body, row.correlation_id)
        session = self._sessions.live_row_or_none(row.session_id)
        tokens_in = estimate_tokens_in(request)
        want = self._worst_case(pool, request)
        deadline_at = None
        if "deadline_ms" in body:
            left_ms = body["deadline_ms"] - (self._clock.now_ms() - row.created_ms)
            deadline_at = asyncio.get_running_loop().time() + left_ms / 1000
        record = TaskRecord(
            row=row,
            request=request,
            priority=row.priority,  # type: ignore[arg-type]
            reservation=want,
            tokens_in_estimate=tokens_in,
            affinity_replica_id=session.last_replica_id if session else None,
            deadline_at=deadline_at,
            flow=pool.flow_for(row.owner, row.session_id, {}),
            queue_position_at_start=len(pool.queue),
        )
        self._sessions.reserve(row.session_id, row.task_id, want)
        self._registry.add(record)
        pool.queue.push(record, record.priority)
        pool.record_queue()
        pool.wakeup.set()
        return True

    def _replay(self, task_id: str, digest: str, caller: Caller) -> Admission | None:
        """The answer to a resubmitted task_id: the same task, or 409 for another body (or
        another key's task: its id is taken, and nothing else about it is told)."""
        row = self._db.get_task(task_id)
        if row is None:
            return None
        if row.request_digest != digest or (
            caller.visible_to is not None and row.owner != caller.visible_to
        ):
            raise TaskExists(f"task {task_id} exists with another body")
        record = self._registry.live.get(task_id)
        pool = self._registry.pools[row.pool_id]
        position = 0
        state = row.state
        if record is not None:
            state = record.state
            position = pool.queue.position(record, record.priority) or 0
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
            remaining=self._sessions.remaining_for(row.session_id),
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
    if request.messages is None:
        raise InvalidParams(f"'{min(needs)}' is not served for a prompt, only for messages")
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


def _completion_request(
    task_id: str, body: Mapping[str, Any], correlation_id: str
) -> CompletionRequest:
    messages = body.get("messages")
    response_format = body.get("response_format")
    if response_format is not None and response_format["type"] == "text":
        response_format = None  # what every engine does anyway
    return CompletionRequest(
        task_id=task_id,
        model=body["model"],
        prompt=body.get("prompt"),
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages)
        if messages is not None
        else None,
        max_tokens=body["max_tokens"],
        seed=body.get("seed"),
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=tuple(body.get("stop", ())),
        response_format=response_format,
        correlation_id=correlation_id,
    )
