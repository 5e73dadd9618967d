"""Handlers of capabilities, pool operations, probes and metrics."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from llorch.api import views
from llorch.api.problems import envelope_response
from llorch.api.runtime import Runtime
from llorch.contracts import openapi

Reply = tuple[Any, int, dict[str, str]]


class ControlHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def get_capabilities(self) -> Reply:
        body = views.capabilities_body(
            self._rt.settings,
            self._rt.scheduler.capabilities(),
            api_version=openapi("data")["info"]["version"],
            auth_enabled=self._rt.auth.enabled,
        )
        return body, 200, {}

    async def list_pools(self) -> Reply:
        return {"items": [views.pool_health(p) for p in self._rt.scheduler.pools.pools()]}, 200, {}

    async def get_pool_health(self, pool_id: str) -> Reply:
        return self._health(pool_id, 200)

    async def drain_pool(self, pool_id: str, body: dict[str, Any]) -> Reply:
        await self._rt.scheduler.pools.drain_recorded(pool_id, body["deadline_ms"])
        return self._health(pool_id, 202)

    async def resume_pool(self, pool_id: str) -> Reply:
        await self._rt.scheduler.pools.resume_recorded(pool_id)
        return self._health(pool_id, 202)

    async def reload_pool(self, pool_id: str, body: dict[str, Any]) -> Reply:
        await self._rt.scheduler.pools.reload_recorded(pool_id, body["model"])
        return self._health(pool_id, 202)

    def _health(self, pool_id: str, status: int) -> Reply:
        return views.pool_health(self._rt.scheduler.pools.health(pool_id)), status, {}

    async def livez(self) -> Reply:
        return {"status": "ok"}, 200, {}

    async def readyz(self) -> Any:
        reason = await self._rt.not_ready_reason()
        if reason is None:
            return {"status": "ok"}, 200, {}
        response = envelope_response("NOT_READY", reason, retriable=True, retry_after_ms=1000)
        # A JSON error on an operation with a JSON success: connexion wants the body as data.
        return orjson.loads(response.body), response.status_code, dict(response.headers)

    async def get_metrics(self) -> Response:
        body, content_type = self._rt.metrics.exposition()
        return Response(body, media_type=content_type)
