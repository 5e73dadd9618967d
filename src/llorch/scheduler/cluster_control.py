"""Pool operations that hold on every instance of a cluster (ORCH-STATE-0052).

On PostgreSQL, a drain, resume or reload issued on one instance is applied there at once, as on
one instance, and recorded as the pool's desired state in the database with the next
generation (:meth:`Cluster.set_pool_control`). Every instance reads the desired states every
health interval (and whenever :meth:`ClusterPoolOperations.wake` is called: the hook for a
database notification) and applies each generation it has not applied yet, through the same
local operations. An instance that starts applies the cluster's state before it serves.
Every read and record goes through :meth:`Storage.run` (a worker thread): the operations are
applied here on the loop, between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from llorch.errors import LlorchError, StorageError
from llorch.metrics import Metrics
from llorch.persistence import Cluster, PoolControl, Storage
from llorch.scheduler.control import PoolOperations, ReloadFactory
from llorch.scheduler.dispatcher import Dispatcher
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.queue import PRIORITIES
from llorch.scheduler.registry import Registry

log = logging.getLogger("llorch.pools")


class ClusterPoolOperations(PoolOperations):
    def __init__(
        self,
        registry: Registry,
        dispatcher: Dispatcher,
        cancel: Callable[[str], None],
        engines: ReloadFactory,
        cluster: Cluster,
        metrics: Metrics,
        db: Storage,
    ) -> None:
        super().__init__(registry, dispatcher, cancel, engines)
        self._cluster = cluster
        self._db = db
        self._applied: dict[str, int] = {}  # the generation of each pool applied here
        self._woken = asyncio.Event()
        # How many instances share the database: per-key rate limits divide by it.
        self.live_instances = 1
        for pool in registry.pools.values():
            pool.queue_gauge_shared = True
        self._metrics = metrics
        # Tells the other instances a desired state changed (a NOTIFY; the scheduler wires it):
        # they apply it at once rather than at their next sync.
        self.announce: Callable[[], None] = lambda: None

    # -- the operations: applied here, then recorded for the others -------------------------

    async def drain_recorded(self, pool_id: str, deadline_ms: int) -> PoolRuntime:
        await self._catch_up()
        pool = self.drain(pool_id, deadline_ms)
        await self._record(pool_id, draining=True, drain_deadline_ms=deadline_ms)
        return pool

    async def resume_recorded(self, pool_id: str) -> PoolRuntime:
        await self._catch_up()
        pool = self.resume(pool_id)
        await self._record(pool_id, draining=False)
        return pool

    async def reload_recorded(self, pool_id: str, model: str) -> PoolRuntime:
        await self._catch_up()
        pool = self.reload(pool_id, model)
        await self._record(pool_id, model=model)
        return pool

    async def _record(
        self,
        pool_id: str,
        *,
        draining: bool | None = None,
        drain_deadline_ms: int | None = None,
        model: str | None = None,
    ) -> None:
        await self._db.run(
            self._cluster.set_pool_control,
            pool_id,
            draining=draining,
            drain_deadline_ms=drain_deadline_ms,
            model=model,
        )
        self.announce()

    # A refused record leaves the operation applied here only; the client sees the 503 and may
    # issue it again. The generation recorded is not marked applied here: the next sync applies
    # the whole desired state, which this instance has already (and an operation of another
    # instance recorded just before is not skipped).

    async def _catch_up(self) -> None:
        """Apply the others' operations first, so that this one starts from the cluster's
        state (a resume right after a drain on another instance finds the pool draining)."""
        try:
            await self.sync()
        except StorageError as exc:
            log.warning("cannot read the cluster's pool control: %s", exc)

    # -- applying the others' operations ----------------------------------------------------

    def wake(self) -> None:
        """Read and apply the desired states now (a notification that one changed)."""
        self._woken.set()

    async def sync(self) -> None:
        """Apply every pool's desired state whose generation is not applied here yet, and
        refresh the live instance count and the cluster's queue depths (ORCH-STATE-0055)."""
        controls, live, depths = await self._db.run(self._read)
        for control in controls:
            if control.generation > self._applied.get(control.pool_id, 0):
                self._applied[control.pool_id] = control.generation
                self._apply(control)
        self.live_instances = live
        self._metrics.set("llorch_instances_live", self.live_instances)
        for pool in self._registry.pools.values():
            for priority in PRIORITIES:
                depth = depths.get((pool.id, priority), 0)
                pool.metrics.set("llorch_queue_depth", depth, pool_id=pool.id, priority=priority)

    def _read(self) -> tuple[list[PoolControl], int, dict[tuple[str, str], int]]:
        """What a sync reads, in one worker thread's turn."""
        cluster = self._cluster
        return cluster.pool_controls(), cluster.live_instances(), cluster.queue_depths()

    def _apply(self, control: PoolControl) -> None:
        pool = self._registry.pools.get(control.pool_id)
        if pool is None:
            return  # a pool this instance does not serve
        try:
            if control.draining and not pool.draining:
                super().drain(pool.id, control.drain_left_ms)
            elif not control.draining and pool.draining:
                super().resume(pool.id)
            if control.model is not None and control.model != pool.model and not pool.reloading:
                super().reload(pool.id, control.model)
        except LlorchError as exc:  # a reload under way, a model this instance cannot load
            log.error("pool %s: cannot apply the cluster's state: %s", pool.id, exc.message)
        else:
            log.info("pool %s: applied the cluster's generation %d", pool.id, control.generation)

    async def run(self, interval_s: float) -> None:
        """Sync every ``interval_s`` or when woken, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._woken.wait()
            self._woken.clear()
            try:
                await self.sync()
            except StorageError as exc:  # the database lost: the next interval tries again
                log.warning("cannot read the cluster's pool control: %s", exc)
