"""Handlers of the session operations."""

from __future__ import annotations

from typing import Any

from llorch.api.auth import principal
from llorch.api.runtime import Runtime
from llorch.sessions import Session

Reply = tuple[Any, int, dict[str, str]]


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


class SessionHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def create_session(self, body: dict[str, Any] | None = None) -> Reply:
        body = body or {}
        budgets = body.get("budgets", {})
        caller = principal()
        session = self._rt.scheduler.sessions.create(
            ttl_ms=body.get("ttl_ms"),
            max_turns=body.get("max_turns"),
            tokens=budgets.get("tokens"),
            time_ms=budgets.get("time_ms"),
            cost=budgets.get("cost"),
            owner=caller.owner,
            cap=caller.budgets,
        )
        location = {"Location": f"/v1/sessions/{session.row.session_id}"}
        return session_body(session), 201, location

    async def get_session(self, session_id: str) -> Reply:
        sessions = self._rt.scheduler.sessions
        return session_body(sessions.get(session_id, visible_to=principal().visible_owner)), 200, {}

    async def delete_session(self, session_id: str) -> Reply:
        self._rt.scheduler.sessions.delete(session_id, visible_to=principal().visible_owner)
        return None, 204, {}
