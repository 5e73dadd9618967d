"""Typed results of the API, built from the JSON the contract declares.

Each keeps the whole JSON object in ``raw`` (for ``--json`` output and fields added later).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _opt_int(value: Any) -> int | None:
    return int(value) if value is not None else None


@dataclass(frozen=True)
class Budgets:
    """What is left of a session's budgets (from a body or the ``X-Budget-*`` headers)."""

    tokens: int
    time_ms: int
    cost: float

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Budgets:
        return cls(
            int(raw["tokens_remaining"]),
            int(raw["time_ms_remaining"]),
            float(raw["cost_remaining"]),
        )

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Budgets | None:
        try:
            return cls(
                int(headers["x-budget-tokens-remaining"]),
                int(headers["x-budget-time-remaining-ms"]),
                float(headers["x-budget-cost-remaining"]),
            )
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class TaskAccepted:
    task_id: str
    session_id: str
    state: str
    pool_id: str
    queue_position: int
    predicted_start_ms: int
    backoff_ms: int
    budgets: Budgets | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_response(cls, raw: dict[str, Any], headers: Mapping[str, str]) -> TaskAccepted:
        return cls(
            task_id=str(raw["task_id"]),
            session_id=str(raw["session_id"]),
            state=str(raw["state"]),
            pool_id=str(raw["pool_id"]),
            queue_position=int(raw["queue_position"]),
            predicted_start_ms=int(raw["predicted_start_ms"]),
            backoff_ms=int(raw["backoff_ms"]),
            budgets=Budgets.from_headers(headers),
            raw=raw,
        )


@dataclass(frozen=True)
class Task:
    task_id: str
    session_id: str
    model: str
    priority: str
    state: str
    pool_id: str
    queue_position: int | None
    replica_id: str | None
    finish_reason: str | None
    tokens_in: int
    tokens_out: int
    cost: float
    error_code: str | None
    trace_artifact_id: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Task:
        usage = raw.get("usage") or {}
        error = raw.get("error") or {}
        return cls(
            task_id=str(raw["task_id"]),
            session_id=str(raw["session_id"]),
            model=str(raw["model"]),
            priority=str(raw["priority"]),
            state=str(raw["state"]),
            pool_id=str(raw["pool_id"]),
            queue_position=_opt_int(raw.get("queue_position")),
            replica_id=raw.get("replica_id"),
            finish_reason=raw.get("finish_reason"),
            tokens_in=int(usage.get("tokens_in", 0)),
            tokens_out=int(usage.get("tokens_out", 0)),
            cost=float(usage.get("cost", 0.0)),
            error_code=error.get("code"),
            trace_artifact_id=raw.get("trace_artifact_id"),
            raw=raw,
        )


@dataclass(frozen=True)
class Session:
    session_id: str
    ttl_ms_remaining: int
    turns: int
    max_turns: int
    kv_warmth: bool
    budgets: Budgets
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Session:
        return cls(
            session_id=str(raw["session_id"]),
            ttl_ms_remaining=int(raw["ttl_ms_remaining"]),
            turns=int(raw["turns"]),
            max_turns=int(raw["max_turns"]),
            kv_warmth=bool(raw["kv_warmth"]),
            budgets=Budgets.from_json(raw["budgets"]),
            raw=raw,
        )


@dataclass(frozen=True)
class Artifact:
    id: str
    kind: str
    size_bytes: int
    created_ms: int
    tags: tuple[str, ...]
    content: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Artifact:
        return cls(
            id=str(raw["id"]),
            kind=str(raw["kind"]),
            size_bytes=int(raw["size_bytes"]),
            created_ms=int(raw["created_ms"]),
            tags=tuple(raw.get("tags", ())),
            content=raw.get("content"),
            raw=raw,
        )


@dataclass(frozen=True)
class PoolHealth:
    pool_id: str
    live: bool
    ready: bool
    draining: bool
    reloading: bool
    engine: str
    model: str
    queue_depth: int
    replicas: tuple[dict[str, Any], ...]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PoolHealth:
        return cls(
            pool_id=str(raw["pool_id"]),
            live=bool(raw["live"]),
            ready=bool(raw["ready"]),
            draining=bool(raw["draining"]),
            reloading=bool(raw["reloading"]),
            engine=str(raw["engine"]),
            model=str(raw["model"]),
            queue_depth=int(raw["queue_depth"]),
            replicas=tuple(raw.get("replicas", ())),
            raw=raw,
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass ``next_cursor`` back for the next one (None: the last)."""

    items: list[T]
    next_cursor: str | None
