"""DrainMeter and PoolRuntime: advice from measured service time, and replica choice."""

from __future__ import annotations

import pytest

from llorch.config import MockSettings, PlacementSettings, PoolSettings
from llorch.contracts import metrics_contract
from llorch.engines import build_engines
from llorch.metrics import Metrics
from llorch.scheduler.pools import DrainMeter, PoolRuntime


def runtime(*, replicas: int = 2, slots: int = 2, ready: bool = True) -> PoolRuntime:
    settings = PoolSettings(
        id="p",
        replicas=replicas,
        slots_per_replica=slots,
        mock=MockSettings(ttft_ms=100, tokens_per_s=100),
    )
    pool = PoolRuntime(settings, build_engines(settings), Metrics(metrics_contract()))
    for replica in pool.replicas:
        replica.ready = ready
    return pool


def record_many(meter: DrainMeter, service_s: float, times: int = 60) -> None:
    for _ in range(times):
        meter.record(service_s=service_s, ttft_s=None, tokens=0, decode_s=0.0)


def test_the_meter_is_seeded_with_the_engines_nominal_speed() -> None:
    meter = DrainMeter(ttft_s=0.1, tokens_per_s=100, typical_tokens=64)

    assert meter.samples == 0
    assert meter.service_s == pytest.approx(0.1 + 64 / 100)
    assert meter.expected_run_s(50) == pytest.approx(0.1 + 0.5)


@pytest.mark.req("ORCH-DATA-0024")
def test_retry_advice_follows_the_measured_service_time() -> None:
    pool = runtime(replicas=2, slots=2)  # four slots
    seeded = pool.retry_after()
    assert seeded == (1, round((0.1 + 0.64) / 4 * 1000))

    pool.meter.record(service_s=8.0, ttft_s=None, tokens=0, decode_s=0.0)
    one_slow = pool.retry_after()
    assert pool.meter.samples == 1
    assert one_slow[1] > seeded[1]

    record_many(pool.meter, 8.0)
    # Converged on 8 s per task over 4 slots: one place frees up every 2 s.
    assert pool.retry_after() == (2, 2000)
    assert pool.drain_interval_s() == pytest.approx(2.0, rel=1e-3)

    record_many(pool.meter, 0.4)
    assert pool.retry_after() == (1, 100)


@pytest.mark.req("ORCH-DATA-0024")
def test_retry_advice_scales_with_the_number_of_ready_slots() -> None:
    pool = runtime(replicas=2, slots=2)
    record_many(pool.meter, 4.0)
    assert pool.retry_after() == (1, 1000)

    pool.replicas[1].ready = False
    assert pool.slots_total == 2
    assert pool.retry_after() == (2, 2000)


@pytest.mark.req("ORCH-DATA-0014", "ORCH-DATA-0024")
def test_predicted_wait_follows_free_slots_and_measured_service_time() -> None:
    pool = runtime(replicas=2, slots=2)
    record_many(pool.meter, 4.0)  # one place frees every second

    # Four free slots: the first four queue positions start at once.
    assert [pool.wait_s(p) for p in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert pool.wait_s(4) == pytest.approx(1.0, rel=1e-3)

    for replica in pool.replicas:
        replica.busy = 2
    assert pool.slots_busy == 4
    assert pool.wait_s(0) == pytest.approx(1.0, rel=1e-3)
    assert pool.wait_s(2) == pytest.approx(3.0, rel=1e-3)

    record_many(pool.meter, 8.0)
    assert pool.wait_s(2) == pytest.approx(6.0, rel=1e-3)


@pytest.mark.req("ORCH-DATA-0014", "ORCH-DATA-0024")
def test_expected_run_time_follows_measured_ttft_and_throughput() -> None:
    meter = DrainMeter(ttft_s=0.1, tokens_per_s=100)
    before = meter.expected_run_s(100)

    for _ in range(60):
        meter.record(service_s=2.5, ttft_s=0.5, tokens=101, decode_s=2.0)

    assert meter.ttft_s == pytest.approx(0.5, rel=1e-3)
    assert meter.tokens_per_s == pytest.approx(50.5, rel=1e-3)
    assert meter.expected_run_s(100) == pytest.approx(0.5 + 100 / 50.5, rel=1e-3)
    assert meter.expected_run_s(100) > before


def test_samples_without_a_decode_phase_leave_throughput_alone() -> None:
    meter = DrainMeter(ttft_s=0.1, tokens_per_s=100)

    meter.record(service_s=0.2, ttft_s=None, tokens=1, decode_s=0.0)
    meter.record(service_s=0.2, ttft_s=0.15, tokens=0, decode_s=0.0)

    assert meter.samples == 2
    assert meter.tokens_per_s == 100
    assert 0.1 < meter.ttft_s < 0.15


def test_pick_replica_prefers_the_affinity_replica_while_it_has_a_free_slot() -> None:
    pool = runtime(replicas=3, slots=2)
    assert [r.id for r in pool.replicas] == ["p-0", "p-1", "p-2"]
    pool.replicas[1].busy = 1  # more loaded than the others, but still free

    chosen = pool.pick_replica("p-1")
    assert chosen is not None and chosen.id == "p-1"

    pool.replicas[1].busy = 2  # full: fall back to the least loaded
    chosen = pool.pick_replica("p-1")
    assert chosen is not None and chosen.id in ("p-0", "p-2")


@pytest.mark.req("ORCH-ENG-0021")
def test_pick_replica_takes_the_least_loaded_with_a_random_tie_break() -> None:
    pool = runtime(replicas=3, slots=2)

    # Equal loads: every replica gets picked (a miss never piles onto the first replica).
    assert {getattr(pool.pick_replica(None), "id", None) for _ in range(200)} == {
        "p-0",
        "p-1",
        "p-2",
    }

    pool.replicas[0].busy = 1
    assert {getattr(pool.pick_replica(None), "id", None) for _ in range(100)} == {"p-1", "p-2"}

    pool.replicas[1].busy = 1
    pool.replicas[2].busy = 2
    chosen = {getattr(pool.pick_replica("unknown-replica"), "id", None) for _ in range(100)}
    assert chosen == {"p-0", "p-1"}

    for replica in pool.replicas:
        replica.busy = 2
    assert pool.pick_replica(None) is None


@pytest.mark.req("ORCH-ENG-0021")
def test_replica_order_breaks_ties_by_the_order_of_the_replicas() -> None:
    settings = PoolSettings(
        id="p", replicas=3, placement=PlacementSettings(tie_break="replica_order")
    )
    pool = PoolRuntime(settings, build_engines(settings), Metrics(metrics_contract()))
    for replica in pool.replicas:
        replica.ready = True

    assert {getattr(pool.pick_replica(None), "id", None) for _ in range(50)} == {"p-0"}
    pool.replicas[0].busy = 1
    assert {getattr(pool.pick_replica(None), "id", None) for _ in range(50)} == {"p-1"}


def test_a_replica_that_is_not_ready_has_no_free_slot() -> None:
    pool = runtime(replicas=2, slots=2)
    pool.replicas[0].ready = False

    assert pool.replicas[0].free == 0
    assert pool.replicas[1].free == 2
    chosen = pool.pick_replica("p-0")
    assert chosen is not None and chosen.id == "p-1"
    assert (pool.ready, pool.slots_total) == (True, 2)

    pool.replicas[1].ready = False
    assert (pool.ready, pool.slots_total) == (False, 0)
    assert pool.pick_replica("p-0") is None
    # With nothing ready, nothing is free: even position 0 must wait.
    assert pool.wait_s(0) > 0


def test_a_pool_starts_with_no_ready_replica_and_its_configured_queue() -> None:
    settings = PoolSettings(id="p", replicas=2, slots_per_replica=3)
    pool = PoolRuntime(settings, build_engines(settings), Metrics(metrics_contract()))

    assert pool.id == "p"
    assert pool.ready is False
    assert [r.engine.slots for r in pool.replicas] == [3, 3]
    assert (pool.queue.capacity, pool.queue.policy) == (100, "reject")
