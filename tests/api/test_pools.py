"""Pool operations, capabilities and probes over the real app, in process."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import SettingsFactory
from tests.support import (
    BUSY,
    InProcess,
    assert_envelope,
    fill_slots,
    in_process,
    pool,
    write_lock_held,
)


async def health(api: InProcess, pool_id: str = "default") -> dict[str, Any]:
    response = await api.client.get(f"/v1/pools/{pool_id}/health")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_health(api: InProcess, key: str, value: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        # Polling the public API is the only view a client has of a pool's state.
        while (await health(api))[key] != value:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.mark.req("ORCH-CTRL-0001", "ORCH-CTRL-0030", "ORCH-CTRL-0034")
async def test_pools_and_their_health(settings_for: SettingsFactory) -> None:
    settings = settings_for({"pools": [pool(replicas=2), pool(id="spare", model="other")]})
    async with in_process(settings) as api:
        listed = (await api.client.get("/v1/pools")).json()["items"]
        assert [p["pool_id"] for p in listed] == ["default", "spare"]
        default = await health(api)
        assert default["live"] and default["ready"] and not default["draining"]
        assert default["model"] == "mock-small" and default["engine"] == "mock"
        assert [r["id"] for r in default["replicas"]] == ["default-0", "default-1"]
        assert all(r["state"] == "ready" and r["slots_total"] == 2 for r in default["replicas"])
        for response in (
            await api.client.get("/v1/pools/nope/health"),
            await api.client.post("/v1/pools/nope/drain", json={"deadline_ms": 10}),
            await api.client.post("/v1/pools/nope/resume"),
            await api.client.post("/v1/pools/nope/reload", json={"model": "x"}),
        ):
            assert_envelope(response, 404, "POOL_NOT_FOUND")


@pytest.mark.req("ORCH-CTRL-0031", "ORCH-CTRL-0032")
async def test_drain_stops_admission_and_cancels_what_is_left_at_the_deadline(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for({"pools": [pool(slots_per_replica=1, mock=BUSY)]})
    async with in_process(settings) as api:
        [running] = await fill_slots(api, 1)
        queued = (await api.submit()).json()["task_id"]
        drained = await api.client.post("/v1/pools/default/drain", json={"deadline_ms": 200})
        assert drained.status_code == 202 and drained.json()["draining"] is True
        refused = await api.submit()
        body = assert_envelope(refused, 503, "POOL_UNAVAILABLE")
        assert body["pool_id"] == "default" and int(refused.headers["retry-after"]) >= 1
        again = await api.client.post("/v1/pools/default/drain", json={"deadline_ms": 10})
        assert_envelope(again, 409, "ALREADY_DRAINING")

        # At the deadline the running and the queued task are canceled and recorded.
        for task_id in (running, queued):
            task = await api.wait_state(task_id, "canceled")
            assert task["finish_reason"] == "canceled"
            assert (await api.events(task_id))[-1].data["finish_reason"] == "canceled"
        assert (await health(api))["queue_depth"] == 0

        assert (await api.client.post("/v1/pools/default/resume")).status_code == 202
        assert (await api.submit()).status_code == 202
        assert_envelope(await api.client.post("/v1/pools/default/resume"), 409, "NOT_DRAINING")


@pytest.mark.req("ORCH-CTRL-0031")
async def test_tasks_that_finish_before_the_drain_deadline_succeed(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "pools": [
                pool(slots_per_replica=1, mock={"ttft_ms": 0, "tokens_per_s": 200, "eos": False})
            ]
        }
    )
    async with in_process(settings) as api:
        first = (await api.submit(max_tokens=10)).json()["task_id"]
        second = (await api.submit(max_tokens=10)).json()["task_id"]
        drained = await api.client.post("/v1/pools/default/drain", json={"deadline_ms": 30_000})
        assert drained.status_code == 202
        for task_id in (first, second):
            assert (await api.wait_state(task_id, "succeeded", "canceled"))["state"] == "succeeded"


@pytest.mark.req("ORCH-CTRL-0033")
async def test_reload_switches_the_model_atomically(settings_for: SettingsFactory) -> None:
    settings = settings_for({"pools": [pool(models=["mock-large"])]})
    async with in_process(settings) as api:
        response = await api.client.post("/v1/pools/default/reload", json={"model": "mock-large"})
        assert response.status_code == 202
        await wait_health(api, "reloading", False)
        after = await health(api)
        assert after["model"] == "mock-large" and after["last_reload_error"] is None
        assert [r["id"] for r in after["replicas"]] == ["default-r1-0"]
        assert (await api.submit(model="mock-large")).status_code == 202
        assert_envelope(await api.submit(model="mock-small"), 400, "INVALID_PARAMS")
        caps = (await api.client.get("/v1/capabilities")).json()
        assert caps["pools"][0]["models"] == ["mock-large"]


@pytest.mark.req("ORCH-CTRL-0033")
async def test_a_failed_reload_rolls_back_and_keeps_serving(settings_for: SettingsFactory) -> None:
    settings = settings_for(
        {
            "pools": [
                pool(
                    models=["broken-model"],
                    mock={"ttft_ms": 0, "tokens_per_s": 0, "fail_load_models": ["broken-model"]},
                )
            ]
        }
    )
    async with in_process(settings) as api:
        response = await api.client.post("/v1/pools/default/reload", json={"model": "broken-model"})
        assert response.status_code == 202 and response.json()["reloading"] is True
        busy = await api.client.post("/v1/pools/default/reload", json={"model": "broken-model"})
        assert_envelope(busy, 409, "RELOAD_IN_PROGRESS")
        # While it loads, and after it failed, the old model keeps serving.
        assert (await api.submit()).status_code == 202
        await wait_health(api, "reloading", False)
        after = await health(api)
        assert after["model"] == "mock-small" and after["ready"] is True
        assert "broken-model" in after["last_reload_error"]
        metrics = (await api.client.get("/metrics")).text
        assert 'llorch_pool_reloads_total{pool_id="default",result="failed"} 1.0' in metrics
        accepted = await api.submit()
        assert (await api.events(accepted.json()["task_id"]))[-1].event == "end"
        unknown = await api.client.post("/v1/pools/default/reload", json={"model": "gpt-99"})
        assert_envelope(unknown, 400, "INVALID_PARAMS")


@pytest.mark.req("ORCH-CTRL-0010")
async def test_capabilities_are_computed_from_the_live_pools(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for(
        {
            "server": {"shutdown_grace_s": 0},
            "pools": [pool(slots_per_replica=2, mock=BUSY, queue={"policy": "drop-lru"})],
            "pricing": {"models": {"mock-small": {"input_per_1k": 1.0, "output_per_1k": 2.0}}},
        }
    )
    async with in_process(settings) as api:
        before = (await api.client.get("/v1/capabilities")).json()
        assert before["api_version"] == "0.1.0"
        [caps] = before["pools"]
        assert (caps["slots_total"], caps["slots_free"]) == (2, 2)
        assert caps["queue_policy"] == "drop-lru" and caps["ready"] is True
        assert caps["features"] == []  # the mock engine cannot shape its text
        assert before["pricing"]["models"]["mock-small"] == {
            "input_per_1k": 1.0,
            "output_per_1k": 2.0,
        }
        assert before["features"]["drop_lru"] is True
        await fill_slots(api, 1)
        after = (await api.client.get("/v1/capabilities")).json()
        assert after["pools"][0]["slots_free"] == 1


@pytest.mark.req("ORCH-CTRL-0040", "ORCH-CTRL-0041")
async def test_probes(settings_for: SettingsFactory) -> None:
    settings = settings_for({"pools": [pool(mock={"failure": {"mode": "down"}})]})
    async with in_process(settings) as api:
        live = await api.client.get("/livez")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        not_ready = await api.client.get("/readyz")
        body = assert_envelope(not_ready, 503, "NOT_READY")
        assert "no pool has a ready replica" in body["message"]
        assert int(not_ready.headers["retry-after"]) >= 1
    async with in_process(settings_for({"pools": [pool()]})) as api:
        ready = await api.client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ok"}


@pytest.mark.req("ORCH-CTRL-0042", "ORCH-CTRL-0040")
async def test_readyz_answers_503_while_the_last_database_write_failed(
    settings_for: SettingsFactory,
) -> None:
    settings = settings_for({"server": {"storage_busy_timeout_ms": 50}, "pools": [pool()]})
    async with in_process(settings) as api:
        assert (await api.client.get("/readyz")).status_code == 200
        # Another process holds the database's write lock past the busy timeout.
        with write_lock_held(settings.database_path):
            assert_envelope(await api.submit(task_id="during-lock"), 503, "STORAGE_UNAVAILABLE")
            not_ready = await api.client.get("/readyz")
            body = assert_envelope(not_ready, 503, "NOT_READY")
            assert "storage" in body["message"]
            assert int(not_ready.headers["retry-after"]) >= 1
            # The process is alive: only readiness follows storage.
            live = await api.client.get("/livez")
            assert live.status_code == 200 and live.json() == {"status": "ok"}
        # Released, the probe's own write succeeds: readiness recovers with no traffic (a
        # balancer that took the server out of rotation sends none).
        ready = await api.client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ok"}
        assert (await api.submit(task_id="after-lock")).status_code == 202


async def test_metrics_are_exposed_in_the_prometheus_text_format(
    settings_for: SettingsFactory,
) -> None:
    async with in_process(settings_for({"pools": [pool()]})) as api:
        response = await api.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert 'llorch_build_info{version="0.1.0"} 1.0' in response.text
