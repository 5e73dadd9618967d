"""The circuit breaker of a replica, and what placement makes of it."""

from __future__ import annotations

import pytest

from llorch.clock import FakeClock
from llorch.config import BreakerSettings, PoolSettings
from llorch.contracts import metrics_contract
from llorch.engines import build_engines
from llorch.engines.breaker import CircuitBreaker
from llorch.metrics import Metrics
from llorch.scheduler.pools import PoolRuntime
from llorch.scheduler.snapshots import pool_snapshot


def breaker(clock: FakeClock, threshold: int = 3, cooldown_s: float = 5.0) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown_s, clock=clock)


@pytest.mark.req("ORCH-ENG-0011")
def test_it_opens_after_n_consecutive_failures_only() -> None:
    b = breaker(FakeClock())
    b.record_failure()
    b.record_failure()
    b.record_success()  # the count is of consecutive failures
    b.record_failure()
    b.record_failure()
    assert (b.state, b.allows_traffic) == ("closed", True)

    b.record_failure()
    assert (b.state, b.allows_traffic) == ("open", False)


@pytest.mark.req("ORCH-ENG-0011")
def test_after_the_cool_down_one_probe_decides() -> None:
    clock = FakeClock()
    b = breaker(clock, threshold=1, cooldown_s=5.0)
    b.record_failure()

    clock.advance(4_999)
    assert b.trial_due() is False
    assert b.state == "open"

    clock.advance(1)
    assert b.trial_due() is True
    assert (b.state, b.allows_traffic) == ("half_open", False)
    b.trial_result(False)
    assert b.state == "open"  # and the cool-down starts again
    clock.advance(4_000)
    assert b.trial_due() is False

    clock.advance(1_000)
    assert b.trial_due() is True
    b.trial_result(True)
    assert (b.state, b.allows_traffic, b.consecutive_failures) == ("closed", True, 0)


def test_a_success_while_open_does_not_close_it() -> None:
    b = breaker(FakeClock(), threshold=1)
    b.record_failure()
    b.record_success()
    b.trial_result(True)  # no trial is running: ignored

    assert b.state == "open"


def test_a_threshold_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        breaker(FakeClock(), threshold=0)


@pytest.mark.req("ORCH-ENG-0012", "ORCH-ENG-0021")
def test_placement_never_picks_a_replica_whose_circuit_is_open() -> None:
    clock = FakeClock()
    settings = PoolSettings(id="p", replicas=2, breaker=BreakerSettings(failure_threshold=1))
    metrics = Metrics(metrics_contract())
    pool = PoolRuntime(settings, build_engines(settings), metrics, clock)
    for replica in pool.replicas:
        replica.ready = True
    pool.replicas[0].breaker.record_failure()
    pool.record_replicas()

    # Even as the session's warm replica, p-0 is skipped.
    chosen = pool.pick_replica("p-0")
    assert chosen is not None and chosen.id == "p-1"
    assert pool.slots_total == 2
    assert [r.state for r in pool_snapshot(pool).replicas] == ["circuit_open", "ready"]
    exposition = metrics.exposition()[0].decode()
    assert 'llorch_replica_breaker_state{pool_id="p",replica_id="p-0"} 2.0' in exposition
    assert 'llorch_replica_breaker_state{pool_id="p",replica_id="p-1"} 0.0' in exposition

    pool.replicas[1].breaker.record_failure()
    assert pool.pick_replica(None) is None
    assert pool.ready is False


@pytest.mark.req("ORCH-ENG-0021")
def test_pick_replica_can_avoid_the_replica_that_just_failed() -> None:
    settings = PoolSettings(id="p", replicas=2)
    pool = PoolRuntime(settings, build_engines(settings), Metrics(metrics_contract()))
    for replica in pool.replicas:
        replica.ready = True

    chosen = pool.pick_replica(None, avoid=pool.replicas[0])
    assert chosen is not None and chosen.id == "p-1"
    assert pool.pick_replica("p-1", avoid=pool.replicas[1]) is pool.replicas[0]
