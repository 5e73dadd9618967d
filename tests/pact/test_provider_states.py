"""The pact provider-state route exists only in the test profile, and only when asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from llorch.api import create_app
from tests.support import in_process, make_settings, pool


@pytest.mark.req("ORCH-CLI-0021")
@pytest.mark.parametrize("profile", ["dev", "prod"])
def test_start_up_refuses_the_route_outside_the_test_profile(tmp_path: Path, profile: str) -> None:
    settings = make_settings(tmp_path, {"server": {"provider_states": True}, "pools": [pool()]})
    with pytest.raises(ValueError, match="only in the test profile"):
        create_app(settings.with_server(profile=profile))


@pytest.mark.req("ORCH-CLI-0021")
async def test_the_route_is_absent_unless_enabled(tmp_path: Path) -> None:
    async with in_process(make_settings(tmp_path, {"pools": [pool()]})) as api:
        response = await api.client.post("/_pact/provider-states", json={"state": "x"})
        assert response.status_code == 404


@pytest.mark.req("ORCH-CLI-0021")
async def test_a_state_is_set_up_and_torn_down_through_the_api(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"server": {"provider_states": True}, "pools": [pool()]})
    async with in_process(settings) as api:
        route = "/_pact/provider-states"
        setup = {"state": "pool default is draining", "params": {}, "action": "setup"}
        assert (await api.client.post(route, json=setup)).status_code == 200
        assert (await api.client.get("/v1/pools/default/health")).json()["draining"] is True
        await api.client.post(route, json=setup | {"action": "teardown"})
        assert (await api.client.get("/v1/pools/default/health")).json()["draining"] is False
        unknown = await api.client.post(
            route, json={"state": "the moon is full", "action": "setup"}
        )
        assert unknown.status_code == 400


@pytest.mark.req("ORCH-CLI-0021")
async def test_a_reload_in_progress_is_a_real_reload_that_rolls_back(tmp_path: Path) -> None:
    spare = pool(
        id="spare",
        model="mock-spare",
        models=["mock-spare-unloadable"],
        mock={"ttft_ms": 0, "tokens_per_s": 0, "fail_load_models": ["mock-spare-unloadable"]},
    )
    settings = make_settings(tmp_path, {"server": {"provider_states": True}, "pools": [spare]})
    async with in_process(settings) as api:
        route = "/_pact/provider-states"
        state = "pool spare is reloading a model that never becomes healthy"
        setup = {"state": state, "params": {}, "action": "setup"}
        assert (await api.client.post(route, json=setup)).status_code == 200
        again = await api.client.post("/v1/pools/spare/reload", json={"model": "mock-spare"})
        assert (again.status_code, again.json()["code"]) == (409, "RELOAD_IN_PROGRESS")
        # Teardown waits for the reload to give up; the pool serves its old model again.
        await api.client.post(route, json=setup | {"action": "teardown"})
        health = (await api.client.get("/v1/pools/spare/health")).json()
        assert (health["reloading"], health["model"]) == (False, "mock-spare")
        assert "mock-spare-unloadable" in health["last_reload_error"]


@pytest.mark.req("ORCH-CLI-0021")
async def test_every_replica_down_is_the_mock_engines_failure_injection(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        {"server": {"provider_states": True}, "pools": [pool(health_interval_ms=50)]},
    )
    async with in_process(settings) as api:
        route = "/_pact/provider-states"
        setup = {"state": "every replica of every pool is down", "params": {}, "action": "setup"}
        assert (await api.client.post(route, json=setup)).status_code == 200
        down = await api.client.get("/readyz")
        refused = await api.submit()
        await api.client.post(route, json=setup | {"action": "teardown"})
        up = await api.client.get("/readyz")
        accepted = await api.submit()

    assert (down.status_code, down.json()["code"]) == (503, "NOT_READY")
    assert "no pool has a ready replica" in down.json()["message"]
    assert (refused.status_code, refused.json()["code"]) == (503, "POOL_UNREADY")
    assert up.status_code == 200
    assert accepted.status_code == 202
