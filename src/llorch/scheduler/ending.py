"""How a task ends: its final values and terminal event, decided at once, and its trace.

The dispatcher decides an ending (:func:`conclude`), has the trace document written
(:func:`trace_document`), then settles it: usage committed, final row written, terminal event
published, in that order, exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from llorch.artifacts import redact
from llorch.clock import Clock
from llorch.config import PricingSettings
from llorch.engines.base import Engine
from llorch.errors import LlorchError
from llorch.scheduler.task import TRANSITIONS, IllegalTransition, TaskRecord


@dataclass
class Ending:
    """How a task ends, decided at once; written and published by ``Dispatcher._settle``."""

    record: TaskRecord
    state: str
    error: LlorchError | None
    finish_reason: str | None
    values: dict[str, Any]  # the final row
    terminal: tuple[str, dict[str, Any]]
    tokens_in: int
    tokens_out: int
    cost: float
    run_ms: int
    decode_ms: int


def conclude(
    record: TaskRecord,
    state: str,
    *,
    clock: Clock,
    pricing: PricingSettings,
    finish_reason: str | None = None,
    error: LlorchError | None = None,
    tokens_in: int | None = None,
    tokens_out: int = 0,
) -> Ending:
    """The task's final values and terminal event, decided now; nothing is written yet."""
    if state not in TRANSITIONS[record.state]:
        raise IllegalTransition(f"task {record.task_id}: {record.state} -> {state}")
    record.ending = True
    now = clock.now_ms()
    tokens_in = record.tokens_in_estimate if tokens_in is None else tokens_in
    if record.started_ms is None:
        tokens_in = 0  # never reached an engine: nothing was read or generated
    price = pricing.price_for(record.request.model)
    cost = round((tokens_in * price.input_per_1k + tokens_out * price.output_per_1k) / 1000, 9)
    run_ms = 0 if record.started_ms is None else max(0, now - record.started_ms)
    decode_ms = 0 if record.ttft_ms is None else max(0, run_ms - record.ttft_ms)
    task_values: dict[str, Any] = {
        "state": state,
        "ended_ms": now,
        "ttft_ms": record.ttft_ms,
        "decode_time_ms": decode_ms,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost": cost,
        "finish_reason": finish_reason,
        "terminal_event_id": record.events.next_seq,
    }
    if error is not None:
        task_values |= {
            "error_code": error.code,
            "error_message": error.message,
            "error_retriable": error.retriable,
        }
    if error is None:
        terminal: tuple[str, dict[str, Any]] = (
            "end",
            {
                "tokens_in": tokens_in,
                "tokens_out": tokens_out,
                "ttft_ms": record.ttft_ms,
                "decode_time_ms": decode_ms,
                "cost": cost,
                "finish_reason": finish_reason or "stop",
            },
        )
    else:
        data: dict[str, Any] = {
            "code": error.code,
            "message": error.message,
            "retriable": error.retriable,
        }
        if error.retry_after_ms is not None and error.retriable:
            data["retry_after_ms"] = error.retry_after_ms
        terminal = ("error", data)
    return Ending(
        record,
        state,
        error,
        finish_reason,
        task_values,
        terminal,
        tokens_in,
        tokens_out,
        cost,
        run_ms,
        decode_ms,
    )


def trace_document(ending: Ending, engine: Engine | None) -> str:
    """The task's trace artifact, as JSON: parameters (redacted), placement, usage, timings and
    the SSE transcript with the frames' real ids, the terminal frame included."""
    record, outcome, terminal = ending.record, ending.values, ending.terminal
    row = record.row
    transcript = [{"id": e.seq, "event": e.kind, "data": e.data} for e in record.events.events]
    transcript.append({"id": record.events.next_seq, "event": terminal[0], "data": terminal[1]})
    trace = {
        "task_id": row.task_id,
        "session_id": row.session_id,
        "correlation_id": row.correlation_id,
        "request": redact(json.loads(row.request_json)),
        "model": row.model,
        "seed": record.request.seed,
        "pool_id": row.pool_id,
        "replica_id": record.replica_id,
        "placement": record.placement,
        "engine": engine.engine if engine else None,
        "engine_version": engine.version if engine else None,
        "state": outcome["state"],
        "finish_reason": outcome["finish_reason"],
        "error": terminal[1] if terminal[0] == "error" else None,
        "usage": {
            "tokens_in": outcome["tokens_in"],
            "tokens_out": outcome["tokens_out"],
            "tokens_cached": record.tokens_cached,
            "cost": outcome["cost"],
        },
        "timings": {
            "created_ms": row.created_ms,
            "started_ms": record.started_ms,
            "ended_ms": outcome["ended_ms"],
            "ttft_ms": record.ttft_ms,
            "decode_time_ms": outcome["decode_time_ms"],
        },
        "transcript": transcript,
    }
    return orjson.dumps(trace).decode()
