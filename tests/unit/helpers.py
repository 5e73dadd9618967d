"""Builders for the rows, requests and records the unit tests feed to the real classes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from llorch.engines.base import Chunk, CompletionRequest, Engine
from llorch.persistence import TaskRow
from llorch.scheduler.queue import Priority
from llorch.scheduler.task import TaskRecord
from llorch.sessions import Reservation

MODEL = "mock-small"
REPO = Path(__file__).resolve().parents[2]


def task_row(
    task_id: str,
    *,
    session_id: str = "s-1",
    pool_id: str = "default",
    priority: Priority = "interactive",
    state: str = "queued",
    created_ms: int = 0,
) -> TaskRow:
    return TaskRow(
        task_id=task_id,
        session_id=session_id,
        pool_id=pool_id,
        model=MODEL,
        priority=priority,
        state=state,
        request_json="{}",
        request_digest=f"digest-{task_id}",
        correlation_id=f"c-{task_id}",
        created_ms=created_ms,
    )


def completion(
    *,
    prompt: str = "tell me a story",
    max_tokens: int = 8,
    seed: int | None = 7,
    stop: tuple[str, ...] = (),
    task_id: str = "t-1",
) -> CompletionRequest:
    return CompletionRequest(
        task_id=task_id,
        model=MODEL,
        prompt=prompt,
        messages=None,
        max_tokens=max_tokens,
        seed=seed,
        stop=stop,
    )


def task_record(task_id: str, priority: Priority = "interactive") -> TaskRecord:
    return TaskRecord(
        row=task_row(task_id, priority=priority),
        request=completion(task_id=task_id),
        priority=priority,
        reservation=Reservation(tokens=12, time_ms=100, cost=0.0),
        tokens_in_estimate=4,
        affinity_replica_id=None,
        deadline_at=None,
    )


async def collect(chunks: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in chunks]


async def stream_all(engine: Engine, request: CompletionRequest) -> list[Chunk]:
    return await collect(engine.stream(request))
