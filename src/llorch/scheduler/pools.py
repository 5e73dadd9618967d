"""Pools at run time: replicas with their slots and circuit breakers, the queue, and the
measured drain rate. A replica serves only while its health probe passes and its circuit is
closed; placement never picks any other."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from llorch.clock import Clock, SystemClock
from llorch.config import PoolSettings
from llorch.engines.base import Engine, EngineLoad
from llorch.engines.breaker import STATE_VALUE, CircuitBreaker
from llorch.metrics import Metrics
from llorch.scheduler.placement import Candidate, PrefixMap, Reason, choose, prompt_text
from llorch.scheduler.queue import PRIORITIES, PoolQueue
from llorch.scheduler.task import TaskRecord

_ALPHA = 0.2  # weight of a new sample in the moving averages
MAX_FLOW_CHARS = 128  # of a flow named by a header's value


def _flow_of(record: TaskRecord) -> str:
    return record.flow


@dataclass(frozen=True)
class Placement:
    replica: Replica
    reason: Reason
    prefix_blocks: int
    hashes: list[int]


@dataclass(eq=False)
class Replica:
    engine: Engine
    breaker: CircuitBreaker
    ready: bool = False
    busy: int = 0
    last_error: str | None = None
    # Monotonic time until which it takes no new task: its engine said it is busy (a 429 or
    # 503, ORCH-ENG-0015). It still serves: its pool stays ready and its circuit closed.
    resting_until: float = 0.0
    # The engine's own load as its last health probe read it (ORCH-ENG-0025), None without,
    # and llorch's busy slots on it when it was read.
    engine_load: EngineLoad | None = None
    busy_at_reading: int = 0
    clock: Clock = field(default_factory=SystemClock)

    @property
    def id(self) -> str:
        return self.engine.replica_id

    @property
    def serving(self) -> bool:
        """Healthy and with a closed circuit: the only replicas placement may pick."""
        return self.ready and self.breaker.allows_traffic

    @property
    def resting(self) -> bool:
        return self.resting_until > 0 and self.clock.monotonic_s() < self.resting_until

    @property
    def free(self) -> int:
        if not self.serving or self.resting:
            return 0
        return max(0, self.engine.slots - self.busy)

    @property
    def load(self) -> float:
        """Placement's load: llorch's busy share of the slots, or the engine's own account when
        that says more (other clients, requests queued inside it)."""
        own = self.busy / max(1, self.engine.slots)
        reading = self.engine_load
        if reading is None:
            return own
        reported = reading.fraction(
            self.engine.slots, busy_now=self.busy, busy_then=self.busy_at_reading
        )
        return own if reported is None else max(own, reported)

    @property
    def state(self) -> str:
        """As ``/v1/pools/{id}/health`` shows it."""
        if not self.breaker.allows_traffic:
            return "circuit_open"
        return "ready" if self.ready else "unready"


# A replica and the setters of its busy slots, total slots and breaker state series.
_ReplicaGauges = tuple[
    Replica, Callable[[float], None], Callable[[float], None], Callable[[float], None]
]


class DrainMeter:
    """Moving averages of what a pool's tasks really take, seeded with the engine's nominal speed.

    Retry advice, predicted start times and deadline feasibility are all derived from these.
    """

    def __init__(self, *, ttft_s: float, tokens_per_s: float, typical_tokens: int = 64) -> None:
        self.ttft_s = ttft_s
        self.tokens_per_s = tokens_per_s  # 0 means "no measurable limit"
        self.service_s = ttft_s + (typical_tokens / tokens_per_s if tokens_per_s > 0 else 0.0)
        self.samples = 0

    def record(
        self, *, service_s: float, ttft_s: float | None, tokens: int, decode_s: float
    ) -> None:
        self.samples += 1
        self.service_s += _ALPHA * (service_s - self.service_s)
        if ttft_s is not None:
            self.ttft_s += _ALPHA * (ttft_s - self.ttft_s)
        if tokens > 1 and decode_s > 0:
            self.tokens_per_s += _ALPHA * (tokens / decode_s - self.tokens_per_s)

    def expected_run_s(self, max_tokens: int) -> float:
        decode = max_tokens / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
        return self.ttft_s + decode


class PoolRuntime:
    def __init__(
        self,
        settings: PoolSettings,
        engines: list[Engine],
        metrics: Metrics,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.replicas = [self.new_replica(engine) for engine in engines]
        self.queue: PoolQueue[TaskRecord] = PoolQueue(
            settings.queue.capacity,
            settings.queue.policy,
            flow_of=_flow_of,
            weights=settings.queue.fairness.weights,
            batch_min_share=settings.queue.batch_min_share,
        )
        self.meter = DrainMeter(
            ttft_s=settings.mock.ttft_ms / 1000, tokens_per_s=settings.mock.tokens_per_s
        )
        self.draining = False
        self.reloading = False
        self.last_reload_error: str | None = None
        self.generation = 0
        self._replica_gauges: tuple[list[Replica] | None, list[_ReplicaGauges]] = (None, [])
        # A reload changes ``settings.model``; the models it may choose from never change.
        self.loadable_models = settings.loadable_models
        # On a cluster, llorch_queue_depth tells the cluster's queue, not this instance's.
        self.queue_gauge_shared = False
        self.wakeup = asyncio.Event()
        # In cluster mode: where a task its engine refused goes back (the shared queue).
        self.send_back: Callable[[TaskRecord], None] | None = None
        # In cluster mode: whether a running task may move its slot to another replica (its
        # lease moved in the database, if that replica has a slot free by every instance's
        # leases, ORCH-STATE-0033); on one instance the replicas' own counts decide.
        self.move_slot: Callable[[TaskRecord, Replica], Awaitable[bool]] | None = None
        self._ended = asyncio.Event()
        # Queued tasks' wait limits, soonest first: (loop time, tie-break, task).
        self._wait_limits: list[tuple[float, int, TaskRecord]] = []
        self._wait_ids = itertools.count()
        self.prefixes = PrefixMap(
            block_chars=settings.placement.prefix_block_chars,
            max_bytes=settings.placement.prefix_map_bytes,
        )
        ordered = settings.placement.tie_break == "replica_order"
        self.rng = None if ordered else rng or random.Random()

    @property
    def id(self) -> str:
        return self.settings.id

    @property
    def model(self) -> str:
        return self.settings.model

    def new_replica(self, engine: Engine) -> Replica:
        breaker = CircuitBreaker(
            failure_threshold=self.settings.breaker.failure_threshold,
            cooldown_s=self.settings.breaker.cooldown_ms / 1000,
            clock=self.clock,
        )
        return Replica(engine, breaker, clock=self.clock)

    def flow_for(self, owner: str | None, session_id: str, headers: Mapping[str, str]) -> str:
        """The flow a task is counted for in the queue's round-robin: its API key, its session,
        or the configured header's value (the key's flow when the header is absent)."""
        fairness = self.settings.queue.fairness
        if fairness.flow == "session":
            return session_id
        if fairness.flow == "header" and fairness.header is not None:
            value = headers.get(fairness.header.lower()) or headers.get(fairness.header)
            if value:
                return value[:MAX_FLOW_CHARS]
        return owner or ""

    @property
    def ready(self) -> bool:
        return any(r.serving for r in self.replicas)

    @property
    def features(self) -> frozenset[str]:
        """What every replica's engine serves beyond text (a pool has one engine type)."""
        if not self.replicas:
            return frozenset()
        return frozenset.intersection(*(r.engine.features for r in self.replicas))

    def unready_reason(self) -> str:
        """Why no replica serves, replica by replica (for ``/readyz``)."""
        parts = [
            f"{r.id} {r.state}" + (f" ({r.last_error})" if r.last_error else "")
            for r in self.replicas
        ]
        return f"pool {self.id}: " + ("; ".join(parts) or "no replicas")

    @property
    def slots_total(self) -> int:
        return sum(r.engine.slots for r in self.replicas if r.serving)

    @property
    def slots_busy(self) -> int:
        return sum(r.busy for r in self.replicas)

    def record_queue(self) -> None:
        if self.queue_gauge_shared:
            return  # the cluster's queue, set from the database (ClusterPoolOperations.sync)
        for priority in PRIORITIES:
            self.metrics.set(
                "llorch_queue_depth", self.queue.depth(priority), pool_id=self.id, priority=priority
            )

    def record_replicas(self) -> None:
        # Several times per task: the replicas' series are resolved once per list of replicas
        # (a reload replaces the list).
        if self._replica_gauges[0] is not self.replicas:
            self._replica_gauges = (self.replicas, [self._gauges_of(r) for r in self.replicas])
        for r, busy, total, breaker in self._replica_gauges[1]:
            busy(r.busy)
            total(r.engine.slots)
            breaker(STATE_VALUE[r.breaker.state])

    def _gauges_of(self, r: Replica) -> _ReplicaGauges:
        labels = {"pool_id": self.id, "replica_id": r.id}
        return (
            r,
            self.metrics.setter("llorch_replica_slots_busy", **labels),
            self.metrics.setter("llorch_replica_slots_total", **labels),
            self.metrics.setter("llorch_replica_breaker_state", **labels),
        )

    def record_state(self) -> None:
        for state, flag in (
            ("ready", self.ready),
            ("draining", self.draining),
            ("reloading", self.reloading),
        ):
            self.metrics.set("llorch_pool_state", int(flag), pool_id=self.id, state=state)

    def watch_wait(self, record: TaskRecord) -> None:
        """Note a queued task's wait limit, if it has one (the pool loop wakes for it)."""
        if record.wait_until is not None:
            heapq.heappush(self._wait_limits, (record.wait_until, next(self._wait_ids), record))

    def next_wait_limit_s(self, now: float) -> float | None:
        """Seconds until the pool loop must look again without being woken: the soonest wait
        limit of a task still queued, or the end of a replica's rest while tasks wait (None:
        nothing to wait for)."""
        limits = self._wait_limits
        while limits and limits[0][2].phase != "queued":
            heapq.heappop(limits)  # dispatched or ended meanwhile
        soonest = max(0.0, limits[0][0] - now) if limits else None
        if self.queue:
            mono = self.clock.monotonic_s()
            for r in self.replicas:
                if r.resting:
                    left = r.resting_until - mono
                    soonest = left if soonest is None else min(soonest, left)
        return soonest

    def rest(self, replica: Replica, retry_after_ms: int | None) -> None:
        """``replica``'s engine said it is busy: it takes no new task for ``retry_after_ms``
        (the engine's ``Retry-After``), else for ``retry.backoff_ms``."""
        rest_ms = self.settings.retry.backoff_ms if retry_after_ms is None else retry_after_ms
        replica.resting_until = self.clock.monotonic_s() + rest_ms / 1000
        # The task it sent back waits for it: the pool looks again when the rest is over (else
        # nothing might wake an idle pool, and the task would wait for unrelated work).
        asyncio.get_running_loop().call_later(rest_ms / 1000, self._rest_over, replica)

    def _rest_over(self, replica: Replica) -> None:
        """Wake the pool once ``replica``'s rest is over by the clock :attr:`Replica.resting`
        reads. A loop's timer may fire before that (uvloop's run in whole milliseconds): woken
        then, the pool found the replica still resting, and once the rest ended, nothing was
        left to wake it (a queued task waited with a free slot)."""
        left = replica.resting_until - self.clock.monotonic_s()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._rest_over, replica)
            return
        self.wakeup.set()

    def requeue(self, record: TaskRecord) -> None:
        """A dispatched task its engine refused goes back to the front of its flow, with its
        reservation and its wait limit; the pool loop places it again (ORCH-ENG-0015)."""
        if self.send_back is not None:
            self.send_back(record)
            return
        self.queue.push_front(record, record.priority)
        self.watch_wait(record)
        self.record_queue()
        self.wakeup.set()

    def overdue(self, now: float) -> list[TaskRecord]:
        """The queued tasks whose wait limit has passed, taken from the queue."""
        due: list[TaskRecord] = []
        limits = self._wait_limits
        while limits and limits[0][0] <= now:
            _, _, record = heapq.heappop(limits)
            if record.phase == "queued" and self.queue.remove(record, record.priority):
                due.append(record)
        if due:
            self.record_queue()
        return due

    def task_ended(self) -> None:
        """Wake everyone waiting for a task of this pool to end (drain, reload)."""
        self._ended.set()
        self._ended = asyncio.Event()

    async def wait_task_end(self, timeout_s: float | None) -> None:
        """Wait until a task of this pool ends; TimeoutError after ``timeout_s``."""
        ended = self._ended
        async with asyncio.timeout(timeout_s):
            await ended.wait()

    def pick_replica(
        self, affinity_replica_id: str | None, avoid: Replica | None = None
    ) -> Replica | None:
        """The session's last replica when it has a free slot, else the least loaded one (ties
        broken at random); never an unready replica or one whose circuit is open, nor ``avoid``."""
        placement = self._choose(affinity_replica_id, [], avoid)
        return None if placement is None else placement.replica

    def place(self, record: TaskRecord) -> Placement | None:
        """Where ``record`` should run (:mod:`llorch.scheduler.placement`); nothing changes until
        :meth:`placed` is called."""
        if not any(r.free > 0 for r in self.replicas):
            return None  # every slot is busy: no prompt to hash yet
        hashes = self.prefixes.hashes(prompt_text(record.request))
        return self._choose(record.affinity_replica_id, hashes, None)

    def _choose(
        self, affinity_replica_id: str | None, hashes: list[int], avoid: Replica | None
    ) -> Placement | None:
        free = [r for r in self.replicas if r.free > 0 and r is not avoid]
        decision = choose(
            [Candidate(r.id, r.load) for r in free],
            session_replica_id=affinity_replica_id,
            hashes=hashes,
            prefixes=self.prefixes,
            rng=self.rng,
        )
        if decision is None:
            return None
        return Placement(free[decision.index], decision.reason, decision.prefix_blocks, hashes)

    def placed(self, record: TaskRecord, placement: Placement) -> None:
        """``record`` was dispatched as ``placement`` says: remember its prompt's prefixes for
        the replica, and count the decision."""
        record.placement = placement.reason
        self.prefixes.record(placement.hashes, placement.replica.id)
        self.metrics.inc("llorch_placements_total", pool_id=self.id, reason=placement.reason)
        self.metrics.set("llorch_prefix_map_bytes", self.prefixes.bytes_used, pool_id=self.id)

    def drain_interval_s(self) -> float:
        """Measured seconds between two tasks leaving the queue when every slot is busy."""
        return self.meter.service_s / max(1, self.slots_total)

    def wait_s(self, position: int) -> float:
        """Predicted wait before a task at ``position`` starts."""
        return self.wait_at()(position)

    def wait_at(self) -> Callable[[int], float]:
        """:meth:`wait_s` as the pool is now, a function of the position alone (for a check
        that runs in a storage call's worker thread)."""
        free, interval = sum(r.free for r in self.replicas), self.drain_interval_s()

        def wait_s(position: int) -> float:
            ahead = position - free + 1
            return 0.0 if ahead <= 0 else ahead * interval

        return wait_s

    def retry_after(self) -> tuple[int, int]:
        """(Retry-After seconds, backoff milliseconds) until a queue place should free up."""
        interval = self.drain_interval_s()
        return max(1, math.ceil(interval)), max(1, round(interval * 1000))
