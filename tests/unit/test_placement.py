"""Cache-aware placement: session, then the longest prompt prefix served, then least loaded; and
the prefix map's memory cap."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from llorch.config import MockSettings, PlacementSettings, PoolSettings
from llorch.contracts import metrics_contract
from llorch.engines import build_engines
from llorch.engines.base import ChatMessage, CompletionRequest, EngineLoad
from llorch.metrics import Metrics
from llorch.persistence import TaskRow
from llorch.scheduler.placement import PrefixMap
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.task import TaskRecord
from llorch.sessions import Reservation

SYSTEM = "You are a careful assistant for the billing team. " * 20  # ~1 KB, 4 blocks of 256


def runtime(*, replicas: int = 3, slots: int = 2, seed: int = 7) -> PoolRuntime:
    settings = PoolSettings(
        id="p",
        replicas=replicas,
        slots_per_replica=slots,
        mock=MockSettings(ttft_ms=100, tokens_per_s=100),
        placement=PlacementSettings(prefix_block_chars=256),
    )
    pool = PoolRuntime(
        settings, build_engines(settings), Metrics(metrics_contract()), rng=random.Random(seed)
    )
    for replica in pool.replicas:
        replica.ready = True
    return pool


def task(user: str, *, session_replica: str | None = None, chat: bool = True) -> TaskRecord:
    messages = (ChatMessage("system", SYSTEM), ChatMessage("user", user)) if chat else None
    request = CompletionRequest(
        task_id="t",
        model="mock-small",
        prompt=None if chat else SYSTEM + user,
        messages=messages,
        max_tokens=8,
    )
    row = TaskRow(
        task_id="t",
        session_id="s",
        pool_id="p",
        model="mock-small",
        priority="interactive",
        state="queued",
        request_json="{}",
        request_digest="d",
        correlation_id="c",
        created_ms=0,
    )
    return TaskRecord(
        row=row,
        request=request,
        priority="interactive",
        reservation=Reservation(tokens=1, time_ms=1, cost=0.0),
        tokens_in_estimate=1,
        affinity_replica_id=session_replica,
        deadline_at=None,
    )


def dispatch(pool: PoolRuntime, record: TaskRecord) -> tuple[str, str]:
    placement = pool.place(record)
    assert placement is not None
    placement.replica.busy += 1
    pool.placed(record, placement)
    return placement.replica.id, placement.reason


@pytest.mark.req("ORCH-ENG-0021", "ORCH-ENG-0024")
@pytest.mark.parametrize("chat", [True, False])
def test_a_shared_prefix_follows_the_replica_that_served_it(chat: bool) -> None:
    pool = runtime()
    warm, reason = dispatch(pool, task("first question", chat=chat))
    assert reason == "least_loaded"

    # Another session with the same system prompt: the warm replica, though it is the busiest.
    again = task("a different question", chat=chat)
    assert dispatch(pool, again) == (warm, "prefix")
    assert again.placement == "prefix"
    assert next(r for r in pool.replicas if r.id == warm).busy == 2

    # The warm replica is full now: the next one goes to the least loaded, never waits for it.
    elsewhere, reason = dispatch(pool, task("a third question", chat=chat))
    assert (elsewhere != warm, reason) == (True, "least_loaded")
    # ... and that replica now served the prefix most recently.
    next(r for r in pool.replicas if r.id == warm).busy = 0
    assert dispatch(pool, task("a fourth question", chat=chat)) == (elsewhere, "prefix")
    exposition = pool.metrics.exposition()[0].decode()
    assert 'llorch_placements_total{pool_id="p",reason="prefix"} 2.0' in exposition


@pytest.mark.req("ORCH-ENG-0021")
def test_the_sessions_replica_comes_before_a_prefix_and_a_short_prompt_has_none() -> None:
    pool = runtime()
    warm, _ = dispatch(pool, task("q"))
    other = next(r.id for r in pool.replicas if r.id != warm)

    assert dispatch(pool, task("q", session_replica=other)) == (other, "session")
    short = runtime()
    # Under one block: nothing to match, so the least loaded (any of the three) each time.
    prompt = CompletionRequest(task_id="t", model="m", prompt="hi", messages=None, max_tokens=1)
    record = task("q")
    record.request = prompt
    picks = set()
    for _ in range(60):
        placement = short.place(record)
        assert placement is not None and placement.reason == "least_loaded"
        picks.add(placement.replica.id)
    assert picks == {"p-0", "p-1", "p-2"}


@pytest.mark.req("ORCH-ENG-0023")
def test_the_prefix_map_stays_under_its_memory_cap_with_random_prompts() -> None:
    cap = 256 * 1024
    rng = random.Random(4)
    prefixes = PrefixMap(block_chars=64, max_bytes=cap)
    replicas = [f"r-{n}" for n in range(8)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(3000):
            size = rng.randint(0, 4000)
            prompt = "".join(rng.choice("abcdefgh ") for _ in range(size))
            prefixes.record(prefixes.hashes(prompt), rng.choice(replicas))
            assert prefixes.bytes_used <= cap
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # Full: the random prompts had far more blocks than the cap holds.
    assert len(prefixes) == prefixes.max_entries == cap // 200
    # What the map really holds, measured by the allocator, is under the cap too.
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert 0 < grown <= cap, grown


@pytest.mark.req("ORCH-ENG-0023")
def test_the_most_recently_used_prefixes_survive_eviction() -> None:
    prefixes = PrefixMap(block_chars=16, max_bytes=200 * 4)  # four entries
    kept = prefixes.hashes("k" * 32)  # two blocks
    prefixes.record(kept, "r-0")
    prefixes.record(prefixes.hashes("x" * 32), "r-1")
    assert prefixes.longest(kept, {"r-0"}) == ("r-0", 2)
    prefixes.record(kept, "r-0")  # used again: the most recent now
    prefixes.record(prefixes.hashes("y" * 32), "r-1")  # evicts x's two blocks, not k's
    assert prefixes.longest(kept, {"r-0"}) == ("r-0", 2)
    assert prefixes.longest(prefixes.hashes("x" * 32), {"r-1"}) is None


@pytest.mark.req("ORCH-ENG-0025")
def test_an_engine_full_by_its_own_account_loses_its_warm_cache_preference() -> None:
    pool = runtime(replicas=2)
    warm, _ = dispatch(pool, task("first question"))
    warm_replica = next(r for r in pool.replicas if r.id == warm)
    cold = next(r for r in pool.replicas if r.id != warm)
    warm_replica.busy = 0  # llorch's count: both idle

    # The warm engine says its slots are full (other clients) and requests wait inside it.
    warm_replica.engine_load = EngineLoad(busy_slots=2, total_slots=2, waiting=3)
    assert warm_replica.load == 2.5 and warm_replica.free == 2
    assert dispatch(pool, task("another question")) == (cold.id, "least_loaded")
    assert dispatch(pool, task("a session's turn", session_replica=warm)) == (cold.id, "prefix")

    # When every candidate is full by its engine's account, the usual order holds again.
    cold.engine_load = EngineLoad(kv_cache_usage=1.0)
    for replica in pool.replicas:
        replica.busy = 0  # both with free slots by llorch's count
    assert dispatch(pool, task("q", session_replica=warm)) == (warm, "session")

    # A load below full ranks the least loaded only: the warm cache still wins.
    warm_replica.engine_load = EngineLoad(kv_cache_usage=0.9)
    cold.engine_load = None
    for replica in pool.replicas:
        replica.busy = 0
    assert dispatch(pool, task("and one more")) == (warm, "prefix")
    assert [r.load for r in pool.replicas if r.id != warm] == [0.0]


@pytest.mark.req("ORCH-ENG-0025")
def test_an_engines_reading_counts_llorchs_own_slots_as_they_are_now() -> None:
    pool = runtime(replicas=2)
    replica = pool.replicas[0]
    # Read while both slots ran llorch's tasks; both have ended since.
    replica.engine_load = EngineLoad(busy_slots=2, total_slots=2)
    replica.busy_at_reading, replica.busy = 2, 0
    assert replica.load == 0.0
    # Read while one slot ran llorch's task and the other another client's.
    replica.busy_at_reading, replica.busy = 1, 1
    assert replica.load == 1.0
    replica.busy = 0
    assert replica.load == 0.5
    # Requests waiting inside the engine always count.
    replica.engine_load = EngineLoad(busy_slots=2, total_slots=2, waiting=1)
    replica.busy_at_reading = 2
    assert replica.load == 0.5
