"""Pool operations: drain, resume, reload, and a snapshot of a pool for the edge.

Drain stops admission at once (admission answers POOL_UNAVAILABLE for a draining pool) and lets
queued and running tasks finish until the deadline; whatever is left then is canceled and
recorded. Reload brings up a new generation of replicas for the new model and moves traffic only
once every new replica passed its health check; otherwise the pool keeps its old replicas and
records why the reload failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from llorch.config import PoolSettings
from llorch.engines.base import Engine
from llorch.errors import (
    AlreadyDraining,
    EngineError,
    InvalidParams,
    NotDraining,
    PoolNotFound,
    ReloadInProgress,
)
from llorch.scheduler.dispatcher import Dispatcher
from llorch.scheduler.pools import PoolRuntime, Replica
from llorch.scheduler.registry import Registry
from llorch.scheduler.snapshots import PoolSnapshot, pool_snapshot
from llorch.scheduler.task import QUEUED

log = logging.getLogger("llorch.pools")

ReloadFactory = Callable[[PoolSettings, int], list[Engine]]

_LOAD_PROBES = 10  # health checks a new replica gets before a reload gives up on it
_LOAD_PROBE_INTERVAL_S = 0.1


class PoolOperations:
    def __init__(
        self,
        registry: Registry,
        dispatcher: Dispatcher,
        cancel: Callable[[str], None],
        engines: ReloadFactory,
    ) -> None:
        self._registry = registry
        self._dispatcher = dispatcher
        self._cancel = cancel
        self._engines = engines
        self._drains: dict[str, asyncio.Task[None]] = {}

    def pool(self, pool_id: str) -> PoolRuntime:
        found = self._registry.pools.get(pool_id)
        if found is None:
            raise PoolNotFound(f"pool {pool_id} not found")
        return found

    # -- drain and resume -------------------------------------------------------------------

    def drain(self, pool_id: str, deadline_ms: int) -> PoolRuntime:
        pool = self.pool(pool_id)
        if pool.draining:
            raise AlreadyDraining(f"pool {pool_id} is already draining", pool_id=pool_id)
        pool.draining = True
        pool.record_state()
        log.info("pool %s draining, deadline %d ms", pool_id, deadline_ms)
        self._drains[pool_id] = self._dispatcher.spawn(
            self._drain(pool, deadline_ms / 1000), f"drain:{pool_id}"
        )
        return pool

    async def _drain(self, pool: PoolRuntime, deadline_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while pool.queue or pool.slots_busy:
            try:
                await pool.wait_task_end(deadline - loop.time())
            except TimeoutError:
                break
        left = [r for r in self._registry.live.values() if r.pool_id == pool.id]
        for record in left:
            self._cancel(record.task_id)
        if left:
            log.info("pool %s drain deadline canceled %d tasks", pool.id, len(left))
        runners = [r.runner for r in left if r.runner is not None and r.state != QUEUED]
        if runners:
            await asyncio.wait(runners, timeout=5)

    def resume(self, pool_id: str) -> PoolRuntime:
        pool = self.pool(pool_id)
        if not pool.draining:
            raise NotDraining(f"pool {pool_id} is not draining", pool_id=pool_id)
        drain = self._drains.pop(pool_id, None)
        if drain is not None:
            drain.cancel()  # tasks still running are not canceled: the pool serves again
        pool.draining = False
        pool.record_state()
        pool.wakeup.set()
        log.info("pool %s resumed", pool_id)
        return pool

    # -- for the edge: the operations as they hold for every instance ----------------------

    async def drain_recorded(self, pool_id: str, deadline_ms: int) -> PoolRuntime:
        """:meth:`drain`, recorded for the other instances of a cluster (none here)."""
        return self.drain(pool_id, deadline_ms)

    async def resume_recorded(self, pool_id: str) -> PoolRuntime:
        """:meth:`resume`, recorded for the other instances of a cluster (none here)."""
        return self.resume(pool_id)

    async def reload_recorded(self, pool_id: str, model: str) -> PoolRuntime:
        """:meth:`reload`, recorded for the other instances of a cluster (none here)."""
        return self.reload(pool_id, model)

    # -- reload -----------------------------------------------------------------------------

    def reload(self, pool_id: str, model: str) -> PoolRuntime:
        pool = self.pool(pool_id)
        if pool.reloading:
            raise ReloadInProgress(f"pool {pool_id} is already reloading", pool_id=pool_id)
        if model not in pool.loadable_models:
            raise InvalidParams(
                f"pool {pool_id} cannot load model {model!r}; it can load "
                f"{list(pool.loadable_models)}",
                pool_id=pool_id,
            )
        pool.reloading = True
        pool.record_state()
        self._dispatcher.spawn(self._reload(pool, model), f"reload:{pool_id}")
        return pool

    async def _reload(self, pool: PoolRuntime, model: str) -> None:
        old = await self._switch(pool, model)
        if old is not None:
            # The reload is over; the previous generation is closed once its tasks have ended.
            await self._retire(pool, old)

    async def _switch(self, pool: PoolRuntime, model: str) -> list[Replica] | None:
        """Bring up the new generation and move traffic to it; the old replicas, or None when
        the reload failed and the pool kept them."""
        try:
            settings = dataclasses.replace(pool.settings, model=model)
            generation = pool.generation + 1
            fresh = [pool.new_replica(engine) for engine in self._engines(settings, generation)]
            failed = await _bring_up(fresh)
            if failed:
                for replica in fresh:
                    await replica.engine.close()
                pool.last_reload_error = (
                    f"reload to {model!r} failed: replicas {failed} did not become healthy; "
                    f"still serving {pool.model!r}"
                )
                log.error("pool %s: %s", pool.id, pool.last_reload_error)
                pool.metrics.inc("llorch_pool_reloads_total", pool_id=pool.id, result="failed")
                return None
            old = pool.replicas
            # The switch: admission and dispatch see the new model and replicas together.
            pool.settings, pool.replicas, pool.generation = settings, fresh, generation
            pool.last_reload_error = None
            pool.wakeup.set()
            log.info("pool %s now serves %r", pool.id, model)
            pool.metrics.inc("llorch_pool_reloads_total", pool_id=pool.id, result="succeeded")
            return old
        finally:
            pool.reloading = False
            pool.record_state()
            pool.record_replicas()

    async def _retire(self, pool: PoolRuntime, replicas: list[Replica]) -> None:
        """Close the previous generation once its running tasks have ended."""
        while any(r.busy for r in replicas):
            await pool.wait_task_end(None)
        for replica in replicas:
            await replica.engine.close()

    # -- views ------------------------------------------------------------------------------

    def health(self, pool_id: str) -> PoolSnapshot:
        return pool_snapshot(self.pool(pool_id))

    def pools(self) -> list[PoolSnapshot]:
        return [pool_snapshot(p) for p in self._registry.pools.values()]


async def _bring_up(replicas: list[Replica]) -> list[str]:
    """Probe new replicas until each is healthy; the ids of those that never were."""
    for _ in range(_LOAD_PROBES):
        for replica in replicas:
            if not replica.ready:
                try:
                    replica.ready = await replica.engine.health()
                except EngineError as exc:
                    replica.last_error = exc.message
        if all(r.ready for r in replicas):
            return []
        await asyncio.sleep(_LOAD_PROBE_INTERVAL_S)
    return [r.id for r in replicas if not r.ready]
