"""What the handlers need, opened in the lifespan and closed in reverse order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from llorch.api.auth import AuthKeys, operation_scopes
from llorch.api.sse import SlowClientGuard, WriteWatch
from llorch.artifacts import ArtifactStore
from llorch.clock import Clock, SystemClock
from llorch.config import Settings
from llorch.contracts import metrics_contract, openapi
from llorch.engines import build_engines
from llorch.errors import StorageError
from llorch.metrics import Metrics
from llorch.persistence import Storage, open_storage, when_free
from llorch.scheduler import Scheduler
from llorch.scheduler.events import EventStream
from llorch.scheduler.service import EngineFactory
from llorch.sessions import SessionService

if TYPE_CHECKING:
    from llorch.persistence.pg_events import ClusterLinks

log = logging.getLogger("llorch")


T = TypeVar("T")
P = ParamSpec("P")


@dataclass
class Runtime:
    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    engines: EngineFactory | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics(metrics_contract()))
    _db: Storage | None = None
    _scheduler: Scheduler | None = None
    _artifacts: ArtifactStore | None = None
    # The live API keys; `auth.replace(keys)` swaps them at run time.
    auth: AuthKeys = field(init=False)
    # The slow-client rules of every open SSE response, in one task.
    sse_watch: WriteWatch = field(default_factory=WriteWatch)
    # Cluster mode (PostgreSQL): the transcript writer and the LISTEN connection of this instance.
    links: ClusterLinks | None = None

    def __post_init__(self) -> None:
        scopes = operation_scopes((openapi("data"), openapi("control")))
        self.auth = AuthKeys(self.settings.auth.keys, self.clock, scopes)

    def slow_client_guard(
        self, stream: EventStream, task_id: str, framing: str = "sse"
    ) -> SlowClientGuard:
        """The slow-client rules of ``server`` for one response streaming ``task_id``."""
        server = self.settings.server
        return SlowClientGuard(
            stream,
            task_id=task_id,
            max_lag_events=server.stream_max_lag_events,
            write_timeout_s=server.stream_write_timeout_s,
            metrics=self.metrics,
            watch=self.sse_watch,
            framing=framing,
        )

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("the runtime is not started")
        return self._scheduler

    @property
    def artifacts(self) -> ArtifactStore:
        if self._artifacts is None:
            raise RuntimeError("the runtime is not started")
        return self._artifacts

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)`` through :meth:`Storage.run`: a read of storage (and of
        nothing else) off the event loop where the store wants it."""
        if self._db is None:
            raise RuntimeError("the runtime is not started")
        return await self._db.run(call, *args, **kwargs)

    async def when_free(self, write: Callable[[], T]) -> T:
        """``write()``, tried again while the database's write lock is held elsewhere."""
        if self._db is None:
            raise RuntimeError("the runtime is not started")
        return await when_free(self._db, write)

    async def not_ready_reason(self) -> str | None:
        """Why the server should not get traffic, or None when it is ready."""
        if self._db is None or self._scheduler is None:
            return "starting: the database is not open and verified yet"
        if self._scheduler.closing:
            return "shutting down"
        if self._db.write_failing and not await self._probe_write():
            return (
                "storage failing: the most recent database write failed; "
                "ready again once one succeeds"
            )
        if not self._scheduler.ready:
            pools = self._scheduler.registry.pools.values()
            return "no pool has a ready replica: " + "; ".join(p.unready_reason() for p in pools)
        return None

    async def _probe_write(self) -> bool:
        """Whether storage takes a write again (False also when it does not answer in time)."""
        assert self._db is not None
        try:
            return await self._db.run(self._db.probe_write)
        except StorageError:
            return False

    async def start(self) -> None:
        s = self.settings
        self._db = open_storage(s)
        if s.database.url is not None:
            # Imported here: a server on SQLite never loads the PostgreSQL driver.
            from llorch.persistence.pg_events import open_links

            self.links = open_links(
                s.database.url, timeout_ms=s.database.timeout_ms, retry_ms=s.database.retry_ms
            )
        sessions = SessionService(self._db, s, self.clock)
        self._artifacts = ArtifactStore(
            self._db,
            s.artifacts_dir,
            max_bytes=s.artifacts.max_bytes,
            clock=self.clock,
            metrics=self.metrics,
        )
        self._scheduler = Scheduler(
            s,
            self._db,
            sessions,
            self.clock,
            self.engines or build_engines,
            artifacts=self._artifacts,
            metrics=self.metrics,
            links=self.links,
        )
        if self.links is not None:
            self.links.transcript.start()
            self.links.listener.start(asyncio.get_running_loop())
        await self._scheduler.start()
        scheduler = self._scheduler
        self.auth.share = lambda: scheduler.live_instances
        log.info("llorch ready: database %s, pools %s", s.storage_shown, [p.id for p in s.pools])

    async def stop(self) -> None:
        await self.sse_watch.close()
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self.links is not None:
            # The frames written so far reach the transcript (for up to 5 s), then the ears shut.
            await asyncio.to_thread(self.links.transcript.close)
            await asyncio.to_thread(self.links.listener.close)
            self.links = None
        if self._db is not None:
            if self._db.offloads:  # its close joins threads: the loop serves their last calls
                await asyncio.to_thread(self._db.close)
            else:
                self._db.close()
        self._scheduler = None
        self._artifacts = None
        self._db = None
