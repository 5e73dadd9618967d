"""Helpers of the wire tests: a live server with an httpx client, and SSE frames as they arrive.

The frames are parsed line by line from the socket (``aiter_lines``), each stamped with the
monotonic time at which its last line arrived, so tests can reason about *when* the client saw
something, not only what it saw. Comment lines (heartbeats) are frames too, with ``event`` None.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from llorch.config import Settings
from tests.support import live_server, task_body

POLL_S = 0.01
# With the default prompt, seed 3 makes the mock stream 460 tokens before it stops on its own:
# max_tokens alone decides the length of a task that uses it.
LONG_SEED = 3


def config(*pools: dict[str, Any], **server: Any) -> dict[str, Any]:
    """A configuration mapping; no shutdown grace, so tasks still running never delay the stop."""
    return {"server": {"shutdown_grace_s": 0, **server}, "pools": list(pools)}


@dataclass(frozen=True)
class Frame:
    """One SSE event, or one comment line (``event`` None, ``comment`` its text)."""

    at: float  # time.monotonic() when the frame was complete on the client
    id: int | None = None
    event: str | None = None
    data: dict[str, Any] | None = None
    comment: str | None = None

    @property
    def payload(self) -> dict[str, Any]:
        assert self.data is not None, f"frame {self} has no data"
        return self.data


def kinds(frames: list[Frame]) -> list[str]:
    """The event names, comments left out."""
    return [f.event for f in frames if f.event is not None]


def events(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.event is not None]


def tokens(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if f.event == "token"]


def assert_sequenced(frames: list[Frame]) -> None:
    """Every event carries its sequence number, from 0 (ORCH-DATA-0051)."""
    ids = [f.id for f in events(frames)]
    assert ids == list(range(len(ids))), ids


def comparable(frames: list[Frame]) -> list[tuple[int | None, str | None, Any]]:
    """What two readers of one stream must agree on: ids, names and payloads."""
    return [(f.id, f.event, f.data) for f in frames if f.event is not None]


async def sse_frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """Yield the frames of an SSE response as they arrive, until the server closes it."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield Frame(at=time.monotonic(), comment=line[1:].strip())
            continue
        if line:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
            continue
        if fields:
            yield Frame(
                at=time.monotonic(),
                id=int(fields["id"]),
                event=fields["event"],
                data=json.loads(fields["data"]),
            )
            fields = {}
    assert not fields, f"the stream closed inside a frame: {fields}"


class Wire:
    """An httpx client on a live server, with the few calls every wire test makes."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def submit(self, headers: Mapping[str, str] | None = None, **overrides: Any) -> str:
        response = await self.client.post("/v1/tasks", json=task_body(**overrides), headers=headers)
        assert response.status_code == 202, response.text
        task_id: str = response.json()["task_id"]
        return task_id

    async def task(self, task_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        task: dict[str, Any] = response.json()
        return task

    async def wait_state(self, task_id: str, *states: str, timeout_s: float = 10) -> dict[str, Any]:
        """Poll the task until it is in one of ``states`` (HTTP state is all a client has)."""
        async with asyncio.timeout(timeout_s):
            while True:
                task = await self.task(task_id)
                if task["state"] in states:
                    return task
                await asyncio.sleep(POLL_S)

    async def cancel(self, task_id: str) -> httpx.Response:
        return await self.client.post(f"/v1/tasks/{task_id}/cancel")

    @asynccontextmanager
    async def stream(
        self, task_id: str, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[Frame]]]:
        """Open the task's SSE stream; yields the response (headers) and its frames."""
        async with self.client.stream(
            "GET", f"/v1/tasks/{task_id}/stream", headers=headers
        ) as response:
            assert response.status_code == 200, (await response.aread()).decode()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield response, sse_frames(response)

    async def read_all(
        self, task_id: str, headers: Mapping[str, str] | None = None, *, timeout_s: float = 10
    ) -> list[Frame]:
        """Every frame of the stream, until the server closes it."""
        async with asyncio.timeout(timeout_s), self.stream(task_id, headers) as (_, frames):
            return [frame async for frame in frames]


async def take_until(
    frames: AsyncIterator[Frame], predicate: Callable[[Frame], bool], *, timeout_s: float = 10
) -> list[Frame]:
    """Read frames up to and including the first one matching ``predicate``."""
    seen: list[Frame] = []
    async with asyncio.timeout(timeout_s):
        async for frame in frames:
            seen.append(frame)
            if predicate(frame):
                return seen
    raise AssertionError(f"the stream closed before the awaited frame: {kinds(seen)}")


def nth_token(n: int) -> Callable[[Frame], bool]:
    """A predicate matching the n-th token frame (1-based)."""
    count = 0

    def match(frame: Frame) -> bool:
        nonlocal count
        if frame.event == "token":
            count += 1
        return count == n and frame.event == "token"

    return match


async def rest(frames: AsyncIterator[Frame], *, timeout_s: float = 10) -> list[Frame]:
    """The remaining frames, until the server closes the stream."""
    async with asyncio.timeout(timeout_s):
        return [frame async for frame in frames]


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Wire]:
    """A real uvicorn on 127.0.0.1 and a client; the client closes before the server stops."""
    with live_server(settings) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield Wire(client)
