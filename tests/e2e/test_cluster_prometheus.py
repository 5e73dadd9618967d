"""The dashboards on a cluster: a real Prometheus scraping two ``llorch serve`` processes on one
PostgreSQL database. Each instance exports its own metrics; the cluster's queue is exported by
both, and the panels count it once (ORCH-STATE-0055)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import instances
from tests.e2e.test_prometheus import BUSY, PROMETHEUS, dashboard_exprs, prometheus, query
from tests.support import MODEL, submit_to, task_of, wait_until

pytestmark = pytest.mark.wire

POOLS = [{"id": "default", "model": MODEL, "replicas": 1, "slots_per_replica": 1,
          "health_interval_ms": 100,
          "mock": BUSY}]  # fmt: skip
PER_INSTANCE = 3  # submitted to each instance; the one shared slot runs one of them


def total(prom: httpx.Client, expr: str) -> float:
    return sum(float(r["value"][1]) for r in query(prom, expr))


def fill(clients: list[httpx.Client]) -> None:
    """PER_INSTANCE tasks through each instance; returns once one of them runs (the replica's
    one slot is leased across the instances, ORCH-STATE-0033)."""
    ids = [submit_to(c, max_tokens=5)["task_id"] for c in clients for _ in range(PER_INSTANCE)]

    def running() -> int:
        return sum(task_of(clients[0], t)["state"] == "running" for t in ids)

    wait_until(lambda: running() == 1, "one task runs")


@pytest.mark.req("ORCH-STATE-0055", "ORCH-MET-0001")
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not on PATH (xtask ci installs it)")
def test_the_queue_panels_count_the_clusters_queue_once(tmp_path: Path, postgres_url: str) -> None:
    panels = [(where, e) for where, e in dashboard_exprs() if "llorch_queue_depth" in e]
    assert panels
    with instances(tmp_path, postgres_url, POOLS, 2) as clients:
        targets = [f"{c.base_url.host}:{c.base_url.port}" for c in clients]
        with (
            prometheus(targets, tmp_path) as prom_url,
            httpx.Client(base_url=prom_url, timeout=10) as prom,
        ):
            fill(clients)
            queued = 2 * PER_INSTANCE - 1
            # Each instance exports the cluster's queue: a sum over instances would double it.
            wait_until(
                lambda: total(prom, "sum(llorch_queue_depth)") == 2 * queued,
                "both instances export the cluster's queue",
            )
            seen: dict[str, Any] = {where: total(prom, expr) for where, expr in panels}
            assert seen == {where: queued for where, _ in panels}, seen
            # Counters are each instance's own: their sum is the cluster's.
            admitted = "sum(llorch_tasks_admitted_total)"
            wait_until(lambda: total(prom, admitted) == 2 * PER_INSTANCE, "admissions summed")
            assert total(prom, 'count(up{job="llorch"} == 1)') == 2
