"""Every operation of both OpenAPI documents as a request to send and a parser of its answer.

The sync and async clients share these, so the two speak the contract in exactly one way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from llorch.client.models import Artifact, Page, PoolHealth, Session, Task, TaskAccepted

T = TypeVar("T")


@dataclass(frozen=True)
class Operation(Generic[T]):
    """One HTTP call: method, path, query, body, and the statuses that mean success."""

    operation_id: str
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    ok: tuple[int, ...]
    params: Mapping[str, str | int] = field(default_factory=dict)
    json: Any = None
    # A raw body instead of ``json`` (with its Content-Type in ``headers``).
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _seg(value: str) -> str:
    return quote(value, safe="")


def _none(_response: httpx.Response) -> None:
    return None


def _json(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    return body


def _query(**values: str | int | None) -> dict[str, str | int]:
    return {k: v for k, v in values.items() if v is not None}


# -- data plane ----------------------------------------------------------------------------------


def create_task(
    *,
    model: str,
    max_tokens: int,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    priority: str | None = None,
    session_id: str | None = None,
    task_id: str | None = None,
    seed: int | None = None,
    deadline_ms: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: list[str] | None = None,
    response_format: dict[str, Any] | None = None,
    placement: dict[str, Any] | None = None,
) -> Operation[TaskAccepted]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    optional = {
        "prompt": prompt,
        "messages": messages,
        "priority": priority,
        "session_id": session_id,
        "task_id": task_id,
        "seed": seed,
        "deadline_ms": deadline_ms,
        "temperature": temperature,
        "top_p": top_p,
        "stop": stop,
        "response_format": response_format,
        "placement": placement,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    return Operation(
        "createTask",
        "POST",
        "/v1/tasks",
        lambda r: TaskAccepted.from_response(r.json(), r.headers),
        (202,),
        json=body,
    )


def _task_page(response: httpx.Response) -> Page[Task]:
    body = response.json()
    return Page([Task.from_json(t) for t in body["items"]], body["next_cursor"])


def list_tasks(
    *,
    session_id: str | None = None,
    state: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Operation[Page[Task]]:
    params = _query(session_id=session_id, state=state, limit=limit, cursor=cursor)
    return Operation("listTasks", "GET", "/v1/tasks", _task_page, (200,), params=params)


def get_task(task_id: str) -> Operation[Task]:
    return Operation(
        "getTask", "GET", f"/v1/tasks/{_seg(task_id)}", lambda r: Task.from_json(r.json()), (200,)
    )


def stream_path(task_id: str) -> str:
    return f"/v1/tasks/{_seg(task_id)}/stream"


def cancel_task(task_id: str) -> Operation[None]:
    return Operation("cancelTask", "POST", f"/v1/tasks/{_seg(task_id)}/cancel", _none, (204,))


def create_session(
    *,
    ttl_ms: int | None = None,
    max_turns: int | None = None,
    tokens: int | None = None,
    time_ms: int | None = None,
    cost: float | None = None,
) -> Operation[Session]:
    budgets = {
        k: v
        for k, v in {"tokens": tokens, "time_ms": time_ms, "cost": cost}.items()
        if v is not None
    }
    body: dict[str, Any] = _query(ttl_ms=ttl_ms, max_turns=max_turns)
    if budgets:
        body["budgets"] = budgets
    return Operation(
        "createSession",
        "POST",
        "/v1/sessions",
        lambda r: Session.from_json(r.json()),
        (201,),
        json=body,
    )


def get_session(session_id: str) -> Operation[Session]:
    return Operation(
        "getSession",
        "GET",
        f"/v1/sessions/{_seg(session_id)}",
        lambda r: Session.from_json(r.json()),
        (200,),
    )


def delete_session(session_id: str) -> Operation[None]:
    return Operation("deleteSession", "DELETE", f"/v1/sessions/{_seg(session_id)}", _none, (204,))


# -- control plane -------------------------------------------------------------------------------


def get_capabilities() -> Operation[dict[str, Any]]:
    return Operation("getCapabilities", "GET", "/v1/capabilities", _json, (200,))


def create_artifact(
    *,
    kind: str,
    content: str,
    tags: list[str] | None = None,
    parent: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Operation[Artifact]:
    body: dict[str, Any] = {"kind": kind, "content": content}
    optional = {"tags": tags, "parent": parent, "metadata": metadata}
    body |= {k: v for k, v in optional.items() if v is not None}
    return Operation(
        "createArtifact",
        "POST",
        "/v1/artifacts",
        lambda r: Artifact.from_json(r.json()),
        (200, 201),
        json=body,
    )


def _artifact_page(response: httpx.Response) -> Page[Artifact]:
    body = response.json()
    return Page([Artifact.from_json(a) for a in body["items"]], body["next_cursor"])


def list_artifacts(
    *,
    kind: str | None = None,
    tag: str | None = None,
    task_id: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Operation[Page[Artifact]]:
    params = _query(kind=kind, tag=tag, task_id=task_id, limit=limit, cursor=cursor)
    return Operation("listArtifacts", "GET", "/v1/artifacts", _artifact_page, (200,), params=params)


def get_artifact(artifact_id: str) -> Operation[Artifact]:
    return Operation(
        "getArtifact",
        "GET",
        f"/v1/artifacts/{_seg(artifact_id)}",
        lambda r: Artifact.from_json(r.json()),
        (200,),
    )


def _pools(response: httpx.Response) -> list[PoolHealth]:
    return [PoolHealth.from_json(p) for p in response.json()["items"]]


def list_pools() -> Operation[list[PoolHealth]]:
    return Operation("listPools", "GET", "/v1/pools", _pools, (200,))


def _pool(response: httpx.Response) -> PoolHealth:
    return PoolHealth.from_json(response.json())


def get_pool_health(pool_id: str) -> Operation[PoolHealth]:
    return Operation("getPoolHealth", "GET", f"/v1/pools/{_seg(pool_id)}/health", _pool, (200,))


def drain_pool(pool_id: str, *, deadline_ms: int) -> Operation[PoolHealth]:
    return Operation(
        "drainPool",
        "POST",
        f"/v1/pools/{_seg(pool_id)}/drain",
        _pool,
        (202,),
        json={"deadline_ms": deadline_ms},
    )


def resume_pool(pool_id: str) -> Operation[PoolHealth]:
    return Operation("resumePool", "POST", f"/v1/pools/{_seg(pool_id)}/resume", _pool, (202,))


def reload_pool(pool_id: str, *, model: str) -> Operation[PoolHealth]:
    return Operation(
        "reloadPool",
        "POST",
        f"/v1/pools/{_seg(pool_id)}/reload",
        _pool,
        (202,),
        json={"model": model},
    )


def livez() -> Operation[dict[str, Any]]:
    return Operation("livez", "GET", "/livez", _json, (200,))


def readyz() -> Operation[dict[str, Any]]:
    return Operation("readyz", "GET", "/readyz", _json, (200,))


def get_metrics() -> Operation[str]:
    return Operation("getMetrics", "GET", "/metrics", lambda r: r.text, (200,))
