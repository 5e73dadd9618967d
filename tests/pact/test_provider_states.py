"""The pact provider-state route is test code around the real app; the shipped app has none."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from asgi_lifespan import LifespanManager

from llorch.api import create_app
from llorch.config import Settings
from tests.pact.conftest import ROOT
from tests.pact.provider_states import PATH, WithProviderStates
from tests.support import InProcess, in_process, make_settings, pool

PACT_CONFIG = ROOT / "tests" / "configs" / "pact.yaml"


@asynccontextmanager
async def with_states(settings: Settings) -> AsyncIterator[InProcess]:
    """The real app wrapped with the state route, as the pact verifier serves it."""
    app = create_app(settings)
    async with (
        LifespanManager(WithProviderStates(app), startup_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://llorch.test"
        ) as client,
    ):
        yield InProcess(client, app)


@pytest.mark.req("ORCH-CLI-0021")
@pytest.mark.parametrize("profile", ["dev", "test", "prod"])
async def test_the_shipped_app_has_no_state_route_in_any_profile(
    tmp_path: Path, profile: str
) -> None:
    # The pact verifier's own configuration, in every profile: still no route.
    raw: dict[str, Any] = yaml.safe_load(PACT_CONFIG.read_text(encoding="utf-8"))
    settings = make_settings(tmp_path, raw).with_server(profile=profile)
    async with in_process(settings) as api:
        setup = {"state": "pool default is draining", "params": {}, "action": "setup"}
        response = await api.client.post(PATH, json=setup)
        health = (await api.client.get("/v1/pools/default/health")).json()
    assert response.status_code == 404
    assert health["draining"] is False


@pytest.mark.req("ORCH-CLI-0021")
async def test_a_state_is_set_up_and_torn_down_through_the_api(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"pools": [pool()]})
    async with with_states(settings) as api:
        route = PATH
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
    settings = make_settings(tmp_path, {"pools": [spare]})
    async with with_states(settings) as api:
        route = PATH
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
    settings = make_settings(tmp_path, {"pools": [pool(health_interval_ms=50)]})
    async with with_states(settings) as api:
        route = PATH
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
