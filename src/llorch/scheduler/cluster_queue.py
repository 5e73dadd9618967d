"""The scheduler's side of the queue shared by the instances on one PostgreSQL database
(cluster mode, ORCH-STATE-0030 .. 0039; the SQL is :mod:`llorch.persistence.pg_queue`).

In cluster mode a queued task lives in the database only: any instance may claim it when one
of the pool's replicas has a slot free by the leases of all instances. An instance holds a
task in ``registry.live`` only while it runs it, from its claim to its end. The instance that
admitted a task keeps its record in :attr:`ClusterQueue.waiting` while it is queued, for the
task's event stream and a cancel there; a claim on the same instance takes that record, a claim
elsewhere builds one from the row. Whoever takes a queued task out of the queue to end it
(a cancel, a wait limit, a deadline, a drop-lru victim) ends it through the settlement.

Every call to the shared queue goes through :meth:`Storage.run` (a worker thread: the event
loop serves meanwhile); this object's state and the records are read and changed on the loop
only, before and after the call. A claim chooses its replica inside its transaction: the
choice is made on the loop (:meth:`ClusterQueue.claim_next`), the transaction's thread waiting.

Dispatchers wake on their own admissions (``pool.wakeup``, or :meth:`ClusterQueue.wake`, the
hook a NOTIFY listener can call) and otherwise poll every ``database.poll_ms``; every
``database.sweep_ms`` an instance takes over the running tasks of instances whose heartbeat
expired and ends them WORKER_RESET; an instance whose own heartbeat has not reached the
database for most of its life stops its runs first (:meth:`ClusterQueue.fence`, ORCH-STATE-0037).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict
from typing import Any, TypeVar

from llorch.clock import Clock
from llorch.config import Settings
from llorch.errors import DeadlineUnmet, QueueFullDropLru, QueueTimeout, StorageError
from llorch.persistence import Reservation, SessionRow, Storage, TaskRow
from llorch.persistence.pg_queue import Entry, PgQueue
from llorch.scheduler.ending import terminal_frame
from llorch.scheduler.events import EventStream
from llorch.scheduler.placement import Candidate, choose, prompt_text
from llorch.scheduler.pools import Placement, PoolRuntime, Replica
from llorch.scheduler.queue import PRIORITIES, batch_every
from llorch.scheduler.registry import Registry
from llorch.scheduler.settle import Settlement
from llorch.scheduler.task import CANCELED, FAILED, QUEUED, TaskRecord, completion_request
from llorch.sessions import SessionService

log = logging.getLogger("llorch.dispatcher")

T = TypeVar("T")

# A live record for a task row taken from the shared queue (its reservation held), or None
# when its pool is gone; with the session's replica (an affinity hint) when known.
Revive = Callable[..., TaskRecord | None]


def entry_of(pool: PoolRuntime, row: TaskRow, flow: str) -> Entry:
    """A task's place in the shared queue: its band, flow and weight, and its wait limit and
    deadline as absolute times counted from its creation."""
    body = json.loads(row.request_json)
    limits = [m for m in (pool.settings.queue.max_wait_ms, body.get("max_wait_ms")) if m]
    deadline_ms = body.get("deadline_ms")
    return Entry(
        pool_id=pool.id,
        band=PRIORITIES.index(row.priority),
        flow=flow,
        weight=pool.settings.queue.fairness.weights.get(flow, 1),
        wait_until_ms=row.created_ms + min(limits) if limits else None,
        deadline_ms=None if deadline_ms is None else row.created_ms + deadline_ms,
    )


class ClusterQueue:
    def __init__(
        self,
        store: PgQueue,
        db: Storage,
        registry: Registry,
        sessions: SessionService,
        settlement: Settlement,
        settings: Settings,
        clock: Clock,
    ) -> None:
        self.store = store
        self._db = db
        self._registry = registry
        self._sessions = sessions
        self._settlement = settlement
        self._clock = clock
        self.poll_s = settings.database.poll_ms / 1000
        self.sweep_s = settings.database.sweep_ms / 1000
        self._ttl_s = settings.database.instance_ttl_ms / 1000
        # Cut off from the database this long, the instance stops its runs (ORCH-STATE-0037):
        # its fence is checked every sweep, and a survivor looks one sweep after the TTL.
        self.fence_s = max(self._ttl_s - 3 * self.sweep_s, self._ttl_s / 2)
        self.waiting: dict[str, TaskRecord] = {}
        self._requeues: dict[str, Entry] = {}  # sent back, their write not committed yet
        self._sends: set[asyncio.Task[None]] = set()  # those writes under way
        self._wait_s = settings.database.timeout_ms / 1000
        self.revive: Revive = lambda row, **_: None  # set by the admitter
        # Tells the other instances a task was queued in ``pool_id`` (a NOTIFY; the scheduler
        # wires it): their dispatchers claim at once rather than at their next poll.
        self.announce: Callable[[str], None] = lambda pool_id: None
        for pool in registry.pools.values():
            pool.send_back = functools.partial(self.requeue, pool)
            pool.move_slot = functools.partial(self.move_slot, pool)

    def wake(self, pool_id: str) -> None:
        """Wake ``pool_id``'s dispatcher: a task was queued or a slot freed (for a NOTIFY)."""
        pool = self._registry.pools.get(pool_id)
        if pool is not None:
            pool.wakeup.set()

    # -- admission --------------------------------------------------------------------------

    async def admit(
        self,
        pool: PoolRuntime,
        row: TaskRow,
        session: SessionRow,
        *,
        new_session: bool,
        flow: str,
        check: Callable[[int], None],
        reservation: Reservation,
    ) -> TaskRow | None:
        """Persist and queue an accepted task, with its session's turn and ``reservation``
        held in the database, in one transaction (in a worker thread: ``check`` must touch
        nothing of the scheduler's); the drop-lru victim's row."""
        queue = pool.settings.queue
        victim = await self._db.run(
            self.store.admit,
            row,
            session,
            new_session=new_session,
            entry=entry_of(pool, row, flow),
            capacity=queue.capacity,
            policy=queue.policy,
            check=check,
            reservation=reservation,
        )
        self.announce(pool.id)
        return victim

    def hold(self, record: TaskRecord) -> None:
        """A task admitted here and queued: its record kept for its stream and a cancel."""
        self.waiting[record.task_id] = record

    async def drop(self, pool: PoolRuntime, victim: TaskRow) -> None:
        """End the task a full drop-lru queue gave up for a newer one."""
        error = QueueFullDropLru(
            f"dropped from the full queue of pool {pool.id} for a newer task",
            policy_label="drop-lru",
            pool_id=pool.id,
        )
        await self._end_taken(victim, FAILED, error=error)

    # -- ending queued tasks ----------------------------------------------------------------

    def _take(self, row: TaskRow, affinity: str | None = None) -> TaskRecord | None:
        """The live record of a task taken from the shared queue by this instance."""
        record = self.waiting.pop(row.task_id, None)
        return record if record is not None else self.revive(row, affinity=affinity)

    async def _end_taken(
        self,
        row: TaskRow,
        state: str,
        *,
        error: QueueTimeout | DeadlineUnmet | QueueFullDropLru | None = None,
    ) -> None:
        record = self._take(row)
        if record is None:  # its pool is gone from this instance's configuration
            await self._settlement.reconcile(row)
            return
        if state == CANCELED:
            record.cancel_requested = True
            self._settlement.end_now(record, CANCELED, finish_reason="canceled")
        else:
            self._settlement.end_now(record, state, error=error)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a queued task, whichever instance admitted it: True when it was queued (it
        ends canceled and is never dispatched)."""
        row = await self._db.run(self.store.take, task_id)
        if row is None:
            return False
        await self._end_taken(row, CANCELED)
        return True

    async def end_overdue(self, pool: PoolRuntime) -> None:
        """End the queued tasks past their wait limit (QUEUE_TIMEOUT) or their deadline."""
        now_ms = self._clock.now_ms()
        for due in await self._db.run(self.store.expire, pool.id, now_ms):
            waited_ms = now_ms - due.row.created_ms
            error: QueueTimeout | DeadlineUnmet
            if due.why == "wait":
                error = QueueTimeout(
                    f"waited {waited_ms} ms in the queue of pool {pool.id}, past its wait limit",
                    retry_after_ms=pool.retry_after()[1],
                    pool_id=pool.id,
                )
            else:
                error = DeadlineUnmet("deadline passed while queued", pool_id=pool.id)
            await self._end_taken(due.row, FAILED, error=error)

    # -- claims -----------------------------------------------------------------------------

    async def claim_next(self, pool: PoolRuntime) -> tuple[TaskRecord, Placement] | None:
        """Claim the head of the pool's shared queue with a slot lease on one of the replicas
        this instance may place on; its record (now live here) and placement. A head whose
        row cannot be read is claimed too, and ended as start-up ends one (ORCH-STATE-0006),
        rather than left to block the queue."""
        slots = {r.id: r.engine.slots for r in pool.replicas if r.serving and not r.resting}
        if not slots:
            return None
        chosen: list[Placement] = []
        unreadable: list[Exception] = []

        def pick(row: TaskRow, free: Mapping[str, int], affinity: str | None) -> str | None:
            try:
                placement = self._place(pool, row, free, affinity)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                unreadable.append(exc)
                return min(free)
            if placement is not None:
                chosen.append(placement)
            return None if placement is None else placement.replica.id

        every = batch_every(pool.settings.queue.batch_min_share)
        on_loop = functools.partial(self._on_loop, asyncio.get_running_loop(), pick)
        claimed = await self._db.run(self.store.claim, pool.id, slots, on_loop, every)
        if claimed is None:
            return None
        row, affinity = claimed[0], claimed[2]
        try:
            record = None if unreadable else self._take(row, affinity)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            unreadable.append(exc)
            record = None
        if record is None:
            await self._give_up(row, unreadable)
            return None
        self._registry.add(record)
        return record, chosen[-1]

    def _on_loop(self, loop: asyncio.AbstractEventLoop, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` on the event loop, from a storage call's worker thread waiting for
        it (inline when already on the loop: a store that does not offload)."""
        try:
            if asyncio.get_running_loop() is loop:
                return call(*args)
        except RuntimeError:  # no loop in this thread: a worker thread
            pass
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(call(*args))
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return done.result(timeout=self._wait_s)

    async def _give_up(self, row: TaskRow, unreadable: list[Exception]) -> None:
        """End a claimed task that cannot run here: unreadable, or its pool gone."""
        if unreadable:
            await self._settlement.quarantine(row, unreadable[0])
            await self._db.run(self.store.release, row.task_id)
        else:
            await self._settlement.reconcile(row)

    def _place(
        self, pool: PoolRuntime, row: TaskRow, free: Mapping[str, int], affinity: str | None
    ) -> Placement | None:
        """Where the queue head should run, among the replicas with a slot free by the leases:
        its session's replica (``affinity``, read in the claim), its prompt's prefix, then the
        least loaded."""
        known = self.waiting.get(row.task_id)
        if known is not None:
            request, affinity = known.request, known.affinity_replica_id or affinity
        else:
            request = completion_request(
                row.task_id, json.loads(row.request_json), row.correlation_id
            )
        hashes = pool.prefixes.hashes(prompt_text(request))
        replicas = [r for r in pool.replicas if r.id in free]
        loads = [max(r.load, 1 - free[r.id] / max(1, r.engine.slots)) for r in replicas]
        decision = choose(
            [Candidate(r.id, load) for r, load in zip(replicas, loads, strict=True)],
            session_replica_id=affinity,
            hashes=hashes,
            prefixes=pool.prefixes,
            rng=pool.rng,
        )
        if decision is None:
            return None
        return Placement(replicas[decision.index], decision.reason, decision.prefix_blocks, hashes)

    def requeue(self, pool: PoolRuntime, record: TaskRecord) -> None:
        """A claimed task its engine refused as busy goes back to the shared queue, its lease
        freed (ORCH-ENG-0015); its record waits here again. The write is a task of its own;
        one storage refuses is sent again by the sweep."""
        self._registry.live.pop(record.task_id, None)
        self.waiting[record.task_id] = record
        entry = entry_of(pool, record.row, record.flow)
        self._own(self._send_back(pool, record.task_id, entry), f"requeue:{record.task_id}")

    async def _send_back(self, pool: PoolRuntime, task_id: str, entry: Entry) -> None:
        try:
            await self._db.run(self.store.requeue, task_id, entry)
        except StorageError as exc:
            log.warning("task %s: could not requeue it yet: %s", task_id, exc)
            self._requeues[task_id] = entry
            return
        self.announce(pool.id)
        pool.wakeup.set()

    async def move_slot(self, pool: PoolRuntime, record: TaskRecord, replica: Replica) -> bool:
        """Move a running task's lease to ``replica`` if it has a slot free by the leases of
        every instance (before the task's first token, ORCH-STATE-0033); False if not, or if
        storage refused the move."""
        move = self.store.move_lease
        try:
            return await self._db.run(
                move, record.task_id, pool.id, replica.id, replica.engine.slots
            )
        except StorageError as exc:
            log.warning("task %s: could not move its slot lease: %s", record.task_id, exc)
            return False

    def _own(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    # -- the sweep --------------------------------------------------------------------------

    async def sweep_loop(self) -> None:
        loop = asyncio.get_running_loop()
        reachable_since: float | None = None
        while True:
            await asyncio.sleep(self.sweep_s)
            now = loop.time()
            if self.store.heartbeat_age_s() >= self.fence_s:
                self.fence()
            # Only once the database has answered this instance for a whole TTL: after an
            # outage, the other instances' heartbeats look expired until they write again.
            adopt = reachable_since is not None and now - reachable_since >= self._ttl_s
            try:
                await self.sweep(adopt=adopt)
            except StorageError as exc:
                reachable_since = None
                log.warning("could not sweep the shared queue: %s", exc)
            else:
                reachable_since = now if reachable_since is None else reachable_since

    def fence(self) -> None:
        """This instance's heartbeat has not reached the database for most of its life: the
        survivors are about to end its running tasks WORKER_RESET and count its leases dead.
        Stop their engine calls first, ending them WORKER_RESET too (ORCH-STATE-0037)."""
        why = (
            "this instance lost the database for longer than its heartbeat lasts; "
            "the task was stopped and may be submitted again"
        )
        stopped = 0
        for record in list(self._registry.live.values()):
            if record.runner is None or record.ending or record.reset_why is not None:
                continue
            record.reset_why = why
            record.runner.cancel()
            stopped += 1
        if stopped:
            log.error(
                "cut off from the database for %.1f s: stopped %d running tasks",
                self.store.heartbeat_age_s(),
                stopped,
                extra={"event": "instance_fenced", "tasks": stopped},
            )

    async def sweep(self, *, adopt: bool = True) -> None:
        """End the running tasks of instances whose heartbeat expired (WORKER_RESET), send
        back what could not be sent back, and let go of waiting records that ended elsewhere."""
        while adopt and (taken := await self._db.run(self.store.adopt_dead)):
            for row in taken:
                log.warning(
                    "task %s: its instance stopped; ending it",
                    row.task_id,
                    extra={"event": "task_adopted", "task_id": row.task_id},
                )
                await self._settlement.reconcile(row, "the instance running the task stopped")
        for task_id, entry in list(self._requeues.items()):
            await self._db.run(self.store.requeue, task_id, entry)
            del self._requeues[task_id]
        if self.waiting:
            for row in await self._db.run(self.store.ended, list(self.waiting)):
                self._forget(row)

    def _forget(self, row: TaskRow) -> None:
        """A task admitted here ended on another instance: its stream here gets its terminal
        frame, its reservation here is released."""
        record = self.waiting.pop(row.task_id, None)
        if record is None:
            return
        self._sessions.release(row.session_id, row.task_id)
        record.events.publish(*terminal_frame(asdict(row)))
        self._registry.retire(record)

    # -- reads ------------------------------------------------------------------------------

    def stream(self, task_id: str) -> EventStream | None:
        record = self.waiting.get(task_id)
        return None if record is None else record.events

    def watch(self, row: TaskRow) -> EventStream | None:
        """The stream of a task queued in the shared queue (admitted here or elsewhere): its
        record kept here as the admitter keeps one, so that a claim here publishes to it, and
        an end elsewhere gives it its terminal frame (:meth:`sweep`); None unless queued."""
        if row.state != QUEUED:
            return None
        record = self.waiting.get(row.task_id) or self.revive(row, affinity=None)
        if record is None:
            return None
        self.waiting[row.task_id] = record
        return record.events

    async def position(self, row: TaskRow) -> int | None:
        return await self._db.run(self.store.position, row.task_id, row.pool_id)
