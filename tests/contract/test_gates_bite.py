"""The contract gates bite: a server that breaks its contract fails pact and schemathesis.

The broken variant is the real server behind a small ASGI wrapper of this test that drops
`X-Budget-Tokens-Remaining` from createTask's 202 answer; both the pact and the OpenAPI
document require it. The same wrapper, switched off, is the control: the real answer passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from schemathesis.core.failures import FailureGroup
from schemathesis.core.jsonschema.types import JsonValue

from llorch.config import Settings
from tests.pact.conftest import PACT_FILE, ROOT
from tests.pact.provider_states import WithProviderStates
from tests.pact.verify import verify
from tests.support import live_server, make_settings

pytestmark = [pytest.mark.contract, pytest.mark.wire]

PACT_CONFIG = ROOT / "tests" / "configs" / "pact.yaml"
CONTRACT_CONFIG = ROOT / "tests" / "configs" / "contract.yaml"
CONTRACT_KEY = "gates-bite-key"
DATA_DOCUMENT = ROOT / "contracts" / "openapi" / "data.yaml"
DROPPED = b"x-budget-tokens-remaining"
CREATE_TASK_202 = r"^createTask answered 202 "


@dataclass
class DropBudgetHeader:
    """ASGI: the app, except that createTask's 202 loses one header while `broken` is on."""

    app: Any
    broken: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) != ("POST", "/v1/tasks"):
            await self.app(scope, receive, send)
            return

        async def dropping(message: Any) -> None:
            start = message["type"] == "http.response.start"
            if self.broken and start and message["status"] == 202:
                headers = [(k, v) for k, v in message["headers"] if k.lower() != DROPPED]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, dropping)


@dataclass
class Served:
    url: str
    wrapper: DropBudgetHeader


@contextmanager
def serve(settings: Settings, *, states: bool = False) -> Iterator[Served]:
    """The real app behind the wrapper; with ``states``, the pact's provider-state route too."""
    wrappers: list[DropBudgetHeader] = []

    def wrap(app: Any) -> DropBudgetHeader:
        wrappers.append(DropBudgetHeader(WithProviderStates(app) if states else app))
        return wrappers[-1]

    with live_server(settings, wrap=wrap) as url:
        yield Served(url, wrappers[0])


def _config(path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return raw


@pytest.fixture
def pact_server(tmp_path: Path) -> Iterator[Served]:
    """The app `xtask.py pact-verify` serves (tests/configs/pact.yaml), behind the wrapper."""
    with serve(make_settings(tmp_path, _config(PACT_CONFIG)), states=True) as served:
        yield served


@pytest.fixture
def contract_server(tmp_path: Path) -> Iterator[Served]:
    """The server `xtask.py contract` runs (tests/configs/contract.yaml, a key of this test)."""
    settings = make_settings(tmp_path, _config(CONTRACT_CONFIG))
    settings = settings.with_overrides({"LLORCH_CONTRACT_KEY": CONTRACT_KEY})
    with serve(settings) as served:
        yield served


def test_pact_verification_fails_when_the_server_drops_a_promised_header(
    pact_server: Served,
) -> None:
    ok, output = verify(pact_server.url, [str(PACT_FILE)], only=CREATE_TASK_202)
    assert ok, output  # control: the real server keeps the pact
    assert "X-Budget-Tokens-Remaining" in output

    pact_server.wrapper.broken = True
    ok, output = verify(pact_server.url, [str(PACT_FILE)], only=CREATE_TASK_202)
    assert not ok
    failures = output[output.index("Failures:") :]
    assert "createTask answered 202" in failures
    assert "X-Budget-Tokens-Remaining" in failures


def test_schemathesis_fails_when_the_server_drops_a_promised_header(
    contract_server: Served, request: pytest.FixtureRequest
) -> None:
    operation = schemathesis.openapi.from_path(DATA_DOCUMENT)["/v1/tasks"]["POST"]
    session = requests.Session()
    session.trust_env = False  # loopback: no proxy from the environment
    request.addfinalizer(session.close)
    auth = {"Authorization": f"Bearer {CONTRACT_KEY}"}
    body: JsonValue = {"model": "mock-small", "prompt": "Tell me a story", "max_tokens": 3}

    # Control: every schemathesis check passes on the real answer.
    response = operation.Case(body=body).call_and_validate(
        base_url=contract_server.url, session=session, headers=auth
    )
    assert response.status_code == 202
    assert "x-budget-tokens-remaining" in response.headers  # (schemathesis lower-cases names)

    contract_server.wrapper.broken = True
    with pytest.raises(FailureGroup) as failed:
        operation.Case(body=body).call_and_validate(
            base_url=contract_server.url, session=session, headers=auth
        )
    assert "X-Budget-Tokens-Remaining" in str(failed.value)
