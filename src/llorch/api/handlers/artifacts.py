"""Handlers of the artifact store."""

from __future__ import annotations

import functools
from typing import Any

from llorch.api import views
from llorch.api.auth import caller
from llorch.api.runtime import Runtime

Reply = tuple[Any, int, dict[str, str]]


class ArtifactHandlers:
    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    async def create_artifact(self, body: dict[str, Any]) -> Reply:
        who = caller()
        put = functools.partial(
            self._rt.artifacts.put,
            kind=body["kind"],
            content=body["content"],
            tags=body.get("tags", ()),
            parent=body.get("parent"),
            metadata=body.get("metadata"),
            owner=who.owner,
            visible_to=who.visible_to,
        )
        artifact, created = await self._rt.when_free(put)
        return (
            views.artifact_body(artifact),
            201 if created else 200,
            {"Location": f"/v1/artifacts/{artifact.id}"},
        )

    async def get_artifact(self, artifact_id: str) -> Reply:
        who = caller()
        artifact, content = await self._rt.run(
            self._rt.artifacts.get, artifact_id, visible_to=who.visible_to, owner=who.owner
        )
        return views.artifact_body(artifact) | {"content": content}, 200, {}

    async def list_artifacts(
        self,
        kind: str | None = None,
        tag: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Reply:
        who = caller()
        items, next_cursor = await self._rt.run(
            self._rt.artifacts.list,
            kind=kind,
            tag=tag,
            task_id=task_id,
            limit=limit,
            cursor=cursor,
            visible_to=who.visible_to,
            owner=who.owner,
        )
        body = {"items": [views.artifact_body(a) for a in items], "next_cursor": next_cursor}
        return body, 200, {}
