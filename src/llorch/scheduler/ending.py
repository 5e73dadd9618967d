"""How a task ends, decided at once: its final values and terminal frame, and its trace.

Pure functions: :class:`llorch.scheduler.settle.Settlement` decides an ending with
:func:`conclude`, has :func:`trace_document` written, then commits and publishes it.
:func:`terminal_frame` is the one builder of a terminal frame, for live streams and replays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from llorch.artifacts import redact
from llorch.clock import Clock
from llorch.config import PricingSettings
from llorch.engines.base import Engine
from llorch.errors import LlorchError
from llorch.scheduler.task import TaskRecord


@dataclass
class Ending:
    """How a task ends, decided at once; written and published by :class:`Settlement`."""

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
    record.check_move(state)
    record.ending = True
    now = clock.now_ms()
    tokens_in = record.tokens_in_estimate if tokens_in is None else tokens_in
    if record.started_ms is None:
        tokens_in = 0  # never reached an engine: nothing was read or generated
    cost = pricing.price_for(record.request.model).cost(tokens_in, tokens_out)
    run_ms = 0 if record.started_ms is None else max(0, now - record.started_ms)
    decode_ms = 0 if record.ttft_ms is None else max(0, run_ms - record.ttft_ms)
    values: dict[str, Any] = {
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
        values |= error_columns(error)
    retry_after_ms = error.retry_after_ms if error is not None else None
    return Ending(
        record,
        state,
        error,
        finish_reason,
        values,
        terminal_frame(values, retry_after_ms=retry_after_ms),
        tokens_in,
        tokens_out,
        cost,
        run_ms,
        decode_ms,
    )


def error_columns(error: LlorchError) -> dict[str, Any]:
    """The task row's columns of the error that ended it."""
    return {
        "error_code": error.code,
        "error_message": error.message,
        "error_retriable": error.retriable,
    }


def terminal_frame(
    values: Mapping[str, Any], *, retry_after_ms: int | None = None
) -> tuple[str, dict[str, Any]]:
    """A task's terminal SSE frame from its final columns (an ending's values, or its stored
    row): the one builder for live streams and for replay."""
    if values.get("error_code") is not None:
        data: dict[str, Any] = {
            "code": values["error_code"],
            "message": values.get("error_message") or "",
            "retriable": bool(values.get("error_retriable")),
        }
        if retry_after_ms is not None and data["retriable"]:
            data["retry_after_ms"] = retry_after_ms
        return "error", data
    return "end", {
        "tokens_in": values["tokens_in"],
        "tokens_out": values["tokens_out"],
        "ttft_ms": values["ttft_ms"],
        "decode_time_ms": values.get("decode_time_ms") or 0,
        "cost": values["cost"],
        "finish_reason": values.get("finish_reason") or "stop",
    }


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
