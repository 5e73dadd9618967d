"""Wire shapes: the bodies and headers the contracts declare, built from what the services return.

Handlers take a service's answer (a frozen snapshot, a row, a session) and hand it to one function
here; nothing below ``api/`` builds a response dict. Key order is the order the clients see.
"""

from __future__ import annotations

from typing import Any

from llorch.artifacts import Artifact
from llorch.config import Settings
from llorch.scheduler import Admission
from llorch.scheduler.snapshots import PoolSnapshot, TaskPage, TaskSnapshot
from llorch.scheduler.task import TERMINAL_STATES
from llorch.sessions import Session
from llorch.sessions.service import Remaining


def format_cost(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def budget_headers(left: Remaining) -> dict[str, str]:
    """The ``X-Budget-*`` headers: what is left of the session's budgets."""
    return {
        "X-Budget-Tokens-Remaining": str(left.tokens),
        "X-Budget-Time-Remaining-Ms": str(left.time_ms),
        "X-Budget-Cost-Remaining": format_cost(left.cost),
    }


# -- tasks ------------------------------------------------------------------------------------


def admission_body(admission: Admission) -> dict[str, Any]:
    """The 202 answer to ``POST /v1/tasks``."""
    return {
        "task_id": admission.task_id,
        "session_id": admission.session_id,
        "state": admission.state,
        "pool_id": admission.pool_id,
        "queue_position": admission.queue_position,
        "predicted_start_ms": admission.predicted_start_ms,
        "backoff_ms": admission.backoff_ms,
        "streams": {"sse": f"/v1/tasks/{admission.task_id}/stream"},
    }


def task_view(task: TaskSnapshot) -> dict[str, Any]:
    row = task.row
    view: dict[str, Any] = {
        "task_id": row.task_id,
        "session_id": row.session_id,
        "model": row.model,
        "priority": row.priority,
        "state": task.state,
        "queue_position": task.queue_position,
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
    # Only an ended task shows an error.
    if row.error_code is not None and task.state in TERMINAL_STATES:
        view["error"] = {
            "code": row.error_code,
            "message": row.error_message or "",
            "retriable": bool(row.error_retriable),
        }
    return view


def task_page(page: TaskPage) -> dict[str, Any]:
    return {"items": [task_view(t) for t in page.items], "next_cursor": page.next_cursor}


# -- pools and capabilities -------------------------------------------------------------------


def pool_health(pool: PoolSnapshot) -> dict[str, Any]:
    return {
        "pool_id": pool.pool_id,
        "live": True,
        "ready": pool.ready,
        "draining": pool.draining,
        "reloading": pool.reloading,
        "engine": pool.engine,
        "model": pool.model,
        "last_reload_error": pool.last_reload_error,
        "replicas": [
            {
                "id": r.id,
                "state": r.state,
                "slots_total": r.slots_total,
                "slots_busy": r.slots_busy,
                "last_error": r.last_error,
            }
            for r in pool.replicas
        ],
        "queue_depth": pool.queue_depth,
    }


def pool_capabilities(pool: PoolSnapshot) -> dict[str, Any]:
    return {
        "pool_id": pool.pool_id,
        "engine": pool.engine,
        "engine_version": pool.engine_version,
        "models": [pool.model],
        "ctx_max": pool.ctx_max,
        "max_tokens_out": pool.max_tokens_out,
        "workloads": ["completion", "chat"],
        "features": list(pool.features),
        "slots_total": pool.slots_total,
        "slots_free": pool.slots_free,
        "queue_capacity": pool.queue_capacity,
        "queue_policy": pool.queue_policy,
        "ready": pool.ready,
        "draining": pool.draining,
    }


def capabilities_body(
    settings: Settings, pools: list[PoolSnapshot], *, api_version: str, auth_enabled: bool
) -> dict[str, Any]:
    """The answer to ``GET /v1/capabilities``."""
    budgets, pricing = settings.budgets, settings.pricing
    return {
        "api_version": api_version,
        "pools": [pool_capabilities(p) for p in pools],
        "budgets": {
            "default_tokens": budgets.default.tokens,
            "default_time_ms": budgets.default.time_ms,
            "default_cost": budgets.default.cost,
            "max_tokens": budgets.max.tokens,
            "max_time_ms": budgets.max.time_ms,
            "max_cost": budgets.max.cost,
            "session_ttl_ms": settings.sessions.ttl_ms,
            "max_turns": settings.sessions.max_turns,
        },
        "pricing": {
            "currency": pricing.currency,
            "default": vars(pricing.default),
            "models": {name: vars(price) for name, price in pricing.models.items()},
        },
        # Off only in the development mode of a loopback bind without keys.
        "auth": {"schemes": ["bearer"] if auth_enabled else [], "required": auth_enabled},
        "features": {
            "sse_resume": True,
            "drop_lru": any(p.queue.policy == "drop-lru" for p in settings.pools),
            "sessions": True,
            "artifacts": True,
            "trace_artifacts": True,
        },
    }


# -- sessions and artifacts ------------------------------------------------------------------


def session_body(session: Session) -> dict[str, Any]:
    row = session.row
    return {
        "session_id": row.session_id,
        "created_ms": row.created_ms,
        "ttl_ms": row.ttl_ms,
        "ttl_ms_remaining": session.ttl_ms_remaining,
        "turns": row.turns,
        "max_turns": row.max_turns,
        "kv_warmth": row.last_replica_id is not None,
        "last_pool_id": row.last_pool_id,
        "last_replica_id": row.last_replica_id,
        "budgets": {
            "tokens_remaining": session.remaining.tokens,
            "time_ms_remaining": session.remaining.time_ms,
            "cost_remaining": session.remaining.cost,
        },
    }


def artifact_body(artifact: Artifact) -> dict[str, Any]:
    """The control contract's ``Artifact`` object."""
    return {
        "id": artifact.id,
        "digest": artifact.digest,
        "kind": artifact.kind,
        "size_bytes": artifact.size_bytes,
        "created_ms": artifact.created_ms,
        "tags": list(artifact.tags),
        "parent": artifact.parent,
        "task_id": artifact.task_id,
        "metadata": dict(artifact.metadata),
    }
