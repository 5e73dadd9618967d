"""Pact provider states, set up through real mechanisms only (test profile only).

The pact verifier POSTs ``{"state", "params", "action": "setup" | "teardown"}`` here before and
after each interaction. Every state is reached the way it is in production: the public API's
services (admit, cancel, drain, reload, sessions, artifacts), the configuration the server was
started with (pools whose mock engine injects failures or never loads a model, body limits, the
storage busy timeout), the run-time replacement of the API keys, or another process holding the
database's write lock. The answer carries the values the pact injects into its requests
(``session_id``).

The shipped server has no such route: :class:`WithProviderStates` wraps the real app (as
``tests.support.live_server(wrap=...)`` does) and answers this one path itself; the pact
verifier (tests/pact/verify.py) serves the app that way.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import JSONResponse

from llorch.api.runtime import Runtime
from llorch.config import ApiKey, FailureSettings, RateLimit
from llorch.engines.mock import MockEngine
from llorch.errors import AdmissionReject

PATH = "/_pact/provider-states"

# The keys the pact's interactions present (test profile only; they guard nothing real).
PACT_KEY = "pact-key"
METRICS_ONLY_KEY = "pact-metrics-only"
DATA_ONLY_KEY = "pact-data-only"
NO_SCOPE_KEY = "pact-no-scope"

# Holds the write lock of the database until its stdin closes.
_LOCKER = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "c.execute('BEGIN EXCLUSIVE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)
# The same on PostgreSQL: every table the API writes locked against writes (reads go on) until
# its stdin closes; a write waits for the lock past server.storage_busy_timeout_ms (lock_timeout).
_PG_LOCKER = (
    "import psycopg, sys\n"
    "c = psycopg.connect(sys.argv[1])\n"
    "c.execute('LOCK TABLE sessions, tasks, artifacts, artifact_views IN EXCLUSIVE MODE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)

Params = dict[str, Any]
Setup = Callable[["ProviderStates", Params], Awaitable[dict[str, Any]]]


class StateError(Exception):
    """A state this server cannot set up."""


def _key(name: str, secret: str, scopes: tuple[str, ...], **extra: Any) -> ApiKey:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return ApiKey(name=name, scopes=scopes, sha256=digest, **extra)  # type: ignore[arg-type]


class ProviderStates:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._undo: list[Callable[[], Awaitable[None] | None]] = []
        self._locker: subprocess.Popen[str] | None = None

    async def dispatch(self, request: Request) -> JSONResponse:
        body = await request.json()
        state, params = str(body.get("state", "")), dict(body.get("params") or {})
        if body.get("action") == "teardown":
            await self.teardown()
            return JSONResponse({})
        setup = STATES.get(state)
        if setup is None:
            return JSONResponse({"error": f"unknown provider state {state!r}"}, status_code=400)
        try:
            return JSONResponse(await setup(self, params))
        except StateError as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)

    async def teardown(self) -> None:
        while self._undo:
            result = self._undo.pop()()
            if result is not None:
                await result

    # -- mechanisms --------------------------------------------------------------------------

    async def finished_task(self, task_id: str, model: str) -> None:
        """Submit a task through the admission service and wait for its terminal event."""
        body = {"task_id": task_id, "model": model, "prompt": "Once upon a time", "max_tokens": 3}
        await self.rt.scheduler.admit_when_free(body, f"pact-{task_id}")
        stream = await self.rt.scheduler.fetch_stream(task_id)
        async with asyncio.timeout(30):
            async for event in stream.subscribe(after=None, heartbeat_s=1.0):
                if event is not None and event.kind in ("end", "error"):
                    return

    def keys(self, *keys: ApiKey) -> None:
        self.rt.auth.replace(keys)
        self._undo.append(lambda: self.rt.auth.replace(self.rt.settings.auth.keys))

    def lock_database(self) -> None:
        """Another process takes the database's write lock (past the busy timeout)."""
        url = self.rt.settings.database.url
        script, target = _LOCKER, str(self.rt.settings.database_path)
        if url is not None:
            script, target = _PG_LOCKER, url
        locker = subprocess.Popen(
            [sys.executable, "-c", script, target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert locker.stdout is not None
        if locker.stdout.readline().strip() != "locked":
            raise StateError("the lock holder did not take the lock")

        def release() -> None:
            assert locker.stdin is not None and locker.stdout is not None
            locker.stdin.close()
            locker.wait(timeout=10)
            locker.stdout.close()

        self._undo.append(release)

    def drained(self, pool_id: str) -> None:
        pools = self.rt.scheduler.pools
        if not pools.health(pool_id).draining:
            pools.drain(pool_id, 60_000)
        self.resume_after(pool_id)

    def resume_after(self, pool_id: str) -> None:
        pools = self.rt.scheduler.pools

        def resume() -> None:
            if pools.health(pool_id).draining:
                pools.resume(pool_id)

        self._undo.append(resume)

    async def fill(self, pool_id: str, model: str, count: int) -> None:
        """Occupy every slot and queue place of a pool with long tasks (canceled afterwards).

        A task admitted into a full queue waits for the dispatcher to move the head onto a free
        slot: admitting all of them at once would find the queue full before the slots are.
        """
        ids: list[str] = []

        def cancel() -> None:
            for task_id in ids:
                self.rt.scheduler.cancel(task_id)

        self._undo.append(cancel)
        for task_id in (f"pact-fill-{pool_id}-{i}" for i in range(count)):
            body = {"task_id": task_id, "model": model, "prompt": "fill", "max_tokens": 4000}
            await _until(functools.partial(self._admitted, body), f"a place for {task_id}")
            ids.append(task_id)

    async def _admitted(self, body: dict[str, Any]) -> bool:
        try:
            await self.rt.scheduler.admit_when_free(body, "pact-fill")
        except AdmissionReject:
            return False
        return True


async def _nothing(_s: ProviderStates, _p: Params) -> dict[str, Any]:
    return {}


async def _task_finished(s: ProviderStates, p: Params) -> dict[str, Any]:
    await s.finished_task(str(p.get("task_id", "t-finished")), "mock-small")
    return {}


async def _task_failed(s: ProviderStates, p: Params) -> dict[str, Any]:
    await s.finished_task(str(p.get("task_id", "t-failed")), "mock-broken")
    return {}


async def _task_waited(s: ProviderStates, p: Params) -> dict[str, Any]:
    """Pool waits' one slot busy: the task waits in its queue past the pool's wait limit."""
    await s.fill("waits", "mock-waits", 1)
    await s.finished_task(str(p.get("task_id", "t-waited")), "mock-waits")
    return {}


async def _session_exists(s: ProviderStates, p: Params) -> dict[str, Any]:
    tokens = p.get("tokens")
    session = s.rt.scheduler.sessions.create(
        ttl_ms=None, max_turns=None, tokens=tokens, time_ms=None, cost=None
    )
    return {"session_id": session.row.session_id}


async def _artifact_exists(s: ProviderStates, p: Params) -> dict[str, Any]:
    artifact, _ = s.rt.artifacts.put(
        kind=str(p.get("kind", "document")),
        content=str(p["content"]),
        tags=(),
        parent=None,
        metadata=None,
    )
    return {"artifact_id": artifact.id}


async def _artifact_corrupt(s: ProviderStates, p: Params) -> dict[str, Any]:
    artifact, _ = s.rt.artifacts.put(
        kind="document", content=str(p["content"]), tags=(), parent=None, metadata=None
    )
    content = str(p["content"])
    url = s.rt.settings.database.url
    if url is not None:  # on PostgreSQL the bodies are rows (ORCH-STATE-0054)
        _tamper_row(url, artifact.digest, content + " (tampered on disk)")
        s._undo.append(functools.partial(_tamper_row, url, artifact.digest, content))
        return {"artifact_id": artifact.id}
    path = s.rt.settings.artifacts_dir / artifact.digest[:2] / artifact.digest
    path.write_text(content + " (tampered on disk)", encoding="utf-8")

    def restore() -> None:
        path.write_text(content, encoding="utf-8")

    s._undo.append(restore)
    return {"artifact_id": artifact.id}


def _tamper_row(url: str, digest: str, content: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "UPDATE artifact_bodies SET body = %s WHERE digest = %s", (content.encode(), digest)
        )


async def _pool_draining(s: ProviderStates, p: Params) -> dict[str, Any]:
    s.drained(str(p.get("pool_id", "default")))
    return {}


async def _pool_admitting(s: ProviderStates, p: Params) -> dict[str, Any]:
    # The interaction itself may drain it: resume afterwards.
    s.resume_after(str(p.get("pool_id", "default")))
    return {}


async def _pool_reloading(s: ProviderStates, p: Params) -> dict[str, Any]:
    """A reload through the control service to a model whose replicas the mock engine never
    lets become healthy (`fail_load_models`): it is in progress until its probes give up."""
    pool_id = str(p.get("pool_id", "spare"))
    s.rt.scheduler.pools.reload(pool_id, str(p.get("model", "mock-spare-unloadable")))
    # The control service runs the reload as the dispatcher's task of this name.
    [reload] = [t for t in asyncio.all_tasks() if t.get_name() == f"reload:{pool_id}"]

    async def rolled_back() -> None:
        # Later interactions find the pool idle again, serving its old model.
        async with asyncio.timeout(30):
            await asyncio.shield(reload)

    s._undo.append(rolled_back)
    return {}


async def _pool_full(s: ProviderStates, p: Params) -> dict[str, Any]:
    pool_id = str(p.get("pool_id", "slow"))
    pool = s.rt.settings.pool(pool_id)
    if pool is None:
        raise StateError(f"no pool {pool_id} in the configuration")
    capacity = pool.replicas * pool.slots_per_replica + pool.queue.capacity
    await s.fill(pool_id, pool.model, capacity)
    return {}


async def _no_key(s: ProviderStates, _p: Params) -> dict[str, Any]:
    s.keys(_key("pact", PACT_KEY, ("data", "control", "metrics")))
    return {}


async def _wrong_scope(s: ProviderStates, _p: Params) -> dict[str, Any]:
    s.keys(
        _key("pact-metrics", METRICS_ONLY_KEY, ("metrics",)),
        _key("pact-data", DATA_ONLY_KEY, ("data",)),
        _key("pact-none", NO_SCOPE_KEY, ()),
    )
    return {}


async def _rate_limited(s: ProviderStates, p: Params) -> dict[str, Any]:
    limit = RateLimit(per_s=0.001, burst=1)
    s.keys(_key("pact", PACT_KEY, ("data", "control", "metrics"), rate_limit=limit))
    # The key's one request of its burst, spent as any request spends it.
    s.rt.auth.authenticate(f"Bearer {PACT_KEY}", str(p.get("operation_id", "")))
    return {}


async def _every_replica_down(s: ProviderStates, _p: Params) -> dict[str, Any]:
    """The mock engine's failure injection puts every replica down; the health loop sees it."""
    engines = [
        r.engine
        for pool in s.rt.scheduler.registry.pools.values()
        for r in pool.replicas
        if isinstance(r.engine, MockEngine)
    ]
    before = [(engine, engine.failure) for engine in engines]
    for engine in engines:
        engine.inject(FailureSettings(mode="down"))

    async def back_up() -> None:
        for engine, failure in before:
            engine.inject(failure)
        await _until(lambda: _ready(s, True), "a pool to be ready again")

    s._undo.append(back_up)
    await _until(lambda: _ready(s, False), "every pool to be unready")
    return {}


async def _until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0
) -> None:
    # The health loop probes every pool each health_interval_ms and signals no event for a
    # replica going down: poll its verdict (test profile only, bounded by the timeout).
    try:
        async with asyncio.timeout(timeout_s):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise StateError(f"timed out waiting for {what}") from None


async def _ready(s: ProviderStates, ready: bool) -> bool:
    return (await s.rt.not_ready_reason() is None) == ready


async def _storage_locked(s: ProviderStates, p: Params) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if p.get("session"):
        found = await _session_exists(s, {})
    if p.get("task_id"):
        body = {"task_id": p["task_id"], "model": "mock-slow", "prompt": "x", "max_tokens": 4000}
        await s.rt.scheduler.admit_when_free(body, "pact-locked")
        s._undo.append(lambda: s.rt.scheduler.cancel(str(p["task_id"])))
    s.lock_database()
    return found


STATES: dict[str, Setup] = {
    "the server is running": _nothing,
    "task t-finished has finished": _task_finished,
    "task t-failed failed mid-stream on pool broken": _task_failed,
    "task t-waited waited past the wait limit of pool waits": _task_waited,
    "session S exists": _session_exists,
    "session S has no tokens left": _session_exists,
    "artifact A exists": _artifact_exists,
    "the stored body of artifact A no longer matches its digest": _artifact_corrupt,
    "pool default is draining": _pool_draining,
    "pool default is admitting": _pool_admitting,
    "pool spare is idle": _nothing,
    "pool spare is reloading a model that never becomes healthy": _pool_reloading,
    "pool slow is full with policy reject": _pool_full,
    "the server requires an API key and the request has none": _no_key,
    "the server requires an API key and the request's key is unknown": _no_key,
    "the request's API key lacks the operation's scope": _wrong_scope,
    "the request's API key has spent its rate limit": _rate_limited,
    "another process holds the database's write lock": _storage_locked,
    "every replica of every pool is down": _every_replica_down,
}


class WithProviderStates:
    """ASGI: the real app, plus ``POST /_pact/provider-states`` answered by :class:`ProviderStates`.

    ``app`` is what :func:`llorch.api.create_app` returns (it carries the runtime the states
    act on); every other request goes to it unchanged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.states = ProviderStates(app.runtime)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["method"], scope["path"]) == ("POST", PATH):
            response = await self.states.dispatch(Request(scope, receive))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
