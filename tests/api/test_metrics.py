"""The metrics contract against what /metrics really exposes after real traffic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llorch.contracts import metrics_contract
from llorch.metrics import OTHER, Metrics
from tests.conftest import SettingsFactory
from tests.support import BUSY, InProcess, fill_slots, in_process, pool


async def scrape(api: InProcess) -> dict[str, Any]:
    text = (await api.client.get("/metrics")).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name.removesuffix("_total")]
    total: float = sum(
        s.value
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
    return total


@pytest.mark.req("ORCH-MET-0001", "ORCH-MET-0003")
async def test_every_contract_metric_is_exposed_with_its_type_and_labels(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "server": {"shutdown_grace_s": 0},
            "pools": [
                pool(mock={"ttft_ms": 1, "tokens_per_s": 0, "eos": False}),
                pool(
                    id="busy",
                    model="slow",
                    models=["slow-2"],
                    slots_per_replica=1,
                    mock=BUSY,
                    queue={"capacity": 1},
                ),
                pool(id="broken", model="broken", mock={"failure": {"mode": "mid_stream"}}),
                pool(
                    id="silent",
                    model="silent",
                    decode_timeout_ms=100,
                    mock={
                        "ttft_ms": 1,
                        "tokens_per_s": 0,
                        "failure": {"mode": "hang", "after_tokens": 1},
                    },
                ),
            ],
        }
    )
    async with in_process(settings) as api:
        ok = (await api.submit(max_tokens=5)).json()["task_id"]
        await api.events(ok)
        failed = (await api.submit(model="broken")).json()["task_id"]
        await api.events(failed)
        [running] = await fill_slots(api, 1, model="slow")
        assert (await api.submit(model="slow")).status_code == 202
        assert (await api.submit(model="slow")).status_code == 429
        session = (await api.client.post("/v1/sessions", json={"budgets": {"tokens": 1}})).json()
        assert (await api.submit(session_id=session["session_id"])).status_code == 429
        # The silent engine's run lasts the decode timeout, past its session's 10 ms.
        tight = (await api.client.post("/v1/sessions", json={"budgets": {"time_ms": 10}})).json()
        overrun = await api.submit(model="silent", session_id=tight["session_id"])
        await api.events(overrun.json()["task_id"])
        mid = await scrape(api)
        assert value(mid, "llorch_queue_depth", pool_id="busy", priority="interactive") == 1
        assert value(mid, "llorch_replica_slots_busy", pool_id="busy") == 1
        await api.client.post(f"/v1/tasks/{running}/cancel")
        await api.wait_state(running, "canceled")
        reload = await api.client.post("/v1/pools/busy/reload", json={"model": "slow-2"})
        assert reload.status_code == 202
        async with asyncio.timeout(10):
            while (await api.client.get("/v1/pools/busy/health")).json()["reloading"]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        families = await scrape(api)

    contract = metrics_contract()
    for spec in contract["metrics"]:
        name = spec["name"]
        family = families[name.removesuffix("_total") if spec["type"] == "counter" else name]
        assert family.type == spec["type"], name
        assert family.samples, f"{name} has no sample after the traffic"
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == set(spec["labels"]), (name, sample)

    assert value(families, "llorch_tasks_finished_total", outcome="succeeded") == 1
    assert value(families, "llorch_tasks_finished_total", pool_id="broken", outcome="failed") == 1
    assert value(families, "llorch_tasks_finished_total", pool_id="busy", outcome="canceled") == 1
    assert value(families, "llorch_tasks_rejected_total", code="ADMISSION_REJECT") == 1
    assert value(families, "llorch_budget_rejections_total", policy_label="tokens") == 1
    assert value(families, "llorch_budget_overruns_total", policy_label="time") == 1
    assert value(families, "llorch_engine_errors_total", code="WORKER_RESET") == 1
    assert value(families, "llorch_tokens_out_total", pool_id="default") == 5
    assert value(families, "llorch_open_streams") == 0
    assert value(families, "llorch_pool_reloads_total", pool_id="busy", result="succeeded") == 1
    # The canceled task freed its slot and the queued one started: the queue is empty again.
    assert value(families, "llorch_queue_depth", pool_id="busy", priority="interactive") == 0
    assert (
        value(families, "llorch_http_requests_total", operation_id="createTask", status="429") == 2
    )


@pytest.mark.req("ORCH-MET-0002")
def test_label_values_past_their_budget_or_allowed_values_become_other() -> None:
    contract = {
        "labels": {"pool_id": {"budget": 2}, "outcome": {"values": ["succeeded"]}},
        "metrics": [
            {"name": "t_total", "type": "counter", "help": "h", "labels": ["pool_id", "outcome"]}
        ],
    }
    metrics = Metrics(contract)
    for pool_id in ("a", "b", "c", "d", "a"):
        metrics.inc("t_total", pool_id=pool_id, outcome="succeeded")
    metrics.inc("t_total", pool_id="a", outcome="exploded")
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
    seen = {
        (s.labels["pool_id"], s.labels["outcome"]): s.value
        for s in families["t"].samples
        if s.name == "t_total"
    }
    assert seen == {
        ("a", "succeeded"): 2,
        ("b", "succeeded"): 1,
        (OTHER, "succeeded"): 2,
        ("a", OTHER): 1,
    }
    with pytest.raises(ValueError, match="takes labels"):
        metrics.inc("t_total", pool_id="a")
