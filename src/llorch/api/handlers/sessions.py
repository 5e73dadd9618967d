"""Handlers of the session operations."""

from __future__ import annotations

import functools
from typing import Any

from llorch.api import views
from llorch.api.auth import caller
from llorch.api.runtime import Runtime

Reply = tuple[Any, int, dict[str, str]]


class SessionHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def create_session(self, body: dict[str, Any] | None = None) -> Reply:
        body = body or {}
        budgets = body.get("budgets", {})
        who = caller()
        create = functools.partial(
            self._rt.scheduler.sessions.create,
            ttl_ms=body.get("ttl_ms"),
            max_turns=body.get("max_turns"),
            tokens=budgets.get("tokens"),
            time_ms=budgets.get("time_ms"),
            cost=budgets.get("cost"),
            owner=who.owner,
            cap=who.budgets,
        )
        session = await self._rt.when_free(create)
        location = {"Location": f"/v1/sessions/{session.row.session_id}"}
        return views.session_body(session), 201, location

    async def get_session(self, session_id: str) -> Reply:
        await self._rt.scheduler.durable()  # no charge shown before it is durable
        session = await self._rt.scheduler.sessions.fetch(
            session_id, visible_to=caller().visible_to
        )
        return views.session_body(session), 200, {}

    async def delete_session(self, session_id: str) -> Reply:
        visible_to = caller().visible_to
        sessions = self._rt.scheduler.sessions
        await self._rt.when_free(
            functools.partial(sessions.delete_stored, session_id, visible_to=visible_to)
        )
        sessions.forget(session_id)
        return None, 204, {}
