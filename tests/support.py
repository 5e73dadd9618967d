"""Test support: settings from real configuration, the app in process, a live uvicorn server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from asgi_lifespan import LifespanManager
from connexion import AsyncApp

from llorch.api import create_app
from llorch.api.http import HttpLimits, protocol_class
from llorch.api.runtime import Runtime
from llorch.config import Settings
from llorch.contracts import validate_config
from tools import server
from tools.server import free_port

__all__ = ["free_port"]  # with the helpers defined here

MODEL = "mock-small"
# A replica that holds its slots: the first token comes after a minute.
BUSY = {"ttft_ms": 60_000, "tokens_per_s": 0}


def make_settings(data_dir: Path, raw: Mapping[str, Any] | None = None) -> Settings:
    """Settings from a configuration mapping, validated against the schema like a real file.

    Unless the mapping says otherwise, ``server.shutdown_grace_s`` is 0: a test that leaves a
    task running would otherwise wait the shipped grace (10 s) at every stop.
    """
    raw = dict(raw or {})
    raw["server"] = {"shutdown_grace_s": 0, **raw.get("server", {})}
    validate_config(raw)
    return Settings.from_mapping(raw).with_server(data_dir=str(data_dir), profile="test")


def pool(**overrides: Any) -> dict[str, Any]:
    """A pool configuration: one fast mock replica with two slots unless overridden."""
    base: dict[str, Any] = {
        "id": "default",
        "model": MODEL,
        "replicas": 1,
        "slots_per_replica": 2,
        "mock": {"ttft_ms": 1, "tokens_per_s": 0},
    }
    base.update(overrides)
    return base


def task_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": "tell me a story", "max_tokens": 8}
    body.update(overrides)
    return body


@dataclass
class Sse:
    id: int
    event: str
    data: dict[str, Any]


def parse_sse(text: str) -> list[Sse]:
    """Parse an SSE body into events (comments such as heartbeats are skipped)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "event" in fields:
            events.append(Sse(int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return events


@dataclass
class InProcess:
    client: httpx.AsyncClient
    app: AsyncApp

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.runtime
        return runtime

    async def submit(self, **overrides: Any) -> httpx.Response:
        return await self.client.post("/v1/tasks", json=task_body(**overrides))

    async def events(self, task_id: str, **headers: str) -> list[Sse]:
        """The task's whole stream (it must end: in process the body is read to the end)."""
        response = await self.client.get(f"/v1/tasks/{task_id}/stream", headers=headers)
        assert response.status_code == 200, response.text
        return parse_sse(response.text)

    async def wait_state(self, task_id: str, *states: str, timeout_s: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                task: dict[str, Any] = (await self.client.get(f"/v1/tasks/{task_id}")).json()
                if task["state"] in states:
                    return task
                await asyncio.sleep(0.005)


def sql_connection(api: InProcess) -> sqlite3.Connection:
    """The SQLite connection of the server's database, to trace the statements it runs."""
    database = api.runtime._db
    assert database is not None
    return database._conn


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The answer is ``status`` with the error envelope of ``code``; returns the envelope."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert isinstance(body["message"], str) and body["message"]
    return body


@contextmanager
def write_lock_held(database: Path) -> Iterator[None]:
    """Another process's view of storage failing: a second connection holds the database's
    write lock (``BEGIN EXCLUSIVE``) until the block ends."""
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


async def fill_slots(api: InProcess, count: int, **overrides: Any) -> list[str]:
    """Submit ``count`` tasks (``task_body(**overrides)``) and wait until each is running."""
    ids = []
    for _ in range(count):
        accepted = await api.submit(**overrides)
        assert accepted.status_code == 202, accepted.text
        ids.append(accepted.json()["task_id"])
    for task_id in ids:
        await api.wait_state(task_id, "running")
    return ids


@asynccontextmanager
async def in_process(settings: Settings, **kwargs: Any) -> AsyncIterator[InProcess]:
    """The real app with its lifespan, and an httpx client over ASGI."""
    app = create_app(settings, **kwargs)
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://llorch.test"
        ) as client,
    ):
        yield InProcess(client, app)


@contextmanager
def live_server(settings: Settings, wrap: Callable[[Any], Any] | None = None) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 in a thread; yields its base URL and stops it at the end.

    `wrap` puts an ASGI app of the test around the real one (e.g. a deliberately broken variant).
    """
    port = free_port()
    settings = settings.with_server(host="127.0.0.1", port=port)
    app = create_app(settings)
    config = uvicorn.Config(
        app if wrap is None else wrap(app),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        http=protocol_class(HttpLimits.from_settings(settings)),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_process(
    *args: str, data_dir: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``python -m llorch serve --port P --data-dir D ARGS`` as a user runs it, until it is ready:
    (its URL, the process, its log). Stopped (SIGTERM, then SIGKILL) at the end unless it is."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    argv = [sys.executable, *("-m", "llorch", "serve", "--port", str(port))]
    argv += ["--data-dir", str(data_dir), *args]
    url = f"http://127.0.0.1:{port}"
    log = data_dir.parent / f"server-{port}.log"
    with server.running(argv, log=log, ready_url=f"{url}/readyz", env=env) as proc:
        yield url, proc, log


def wait_until(
    check: Callable[..., Any], what: str = "the condition", timeout_s: float = 20
) -> Any:
    """Poll ``check`` (a server in another process) until it returns something true."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not reached in time"
        time.sleep(0.05)


def submit_to(client: httpx.Client, status: int = 202, **body: Any) -> dict[str, Any]:
    """POST /v1/tasks (model mock-small, prompt "p", then ``body``), answered ``status``."""
    response = client.post("/v1/tasks", json={"model": MODEL, "prompt": "p", **body})
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    return answer


def task_of(client: httpx.Client, task_id: str) -> dict[str, Any]:
    task: dict[str, Any] = client.get(f"/v1/tasks/{task_id}").json()
    return task
