"""Start-up wiring: the contract drives routing, and a missing handler fails start-up."""

from __future__ import annotations

import pytest
from asgi_lifespan import LifespanManager
from connexion import AsyncApp
from connexion.exceptions import ResolverError

from llorch.api.app import OperationResolver
from llorch.api.handlers import operations
from llorch.api.runtime import Runtime
from llorch.contracts import openapi
from tests.conftest import SettingsFactory


def operation_ids(name: str) -> set[str]:
    return {
        op["operationId"]
        for item in openapi(name)["paths"].values()
        for method, op in item.items()
        if isinstance(op, dict) and "operationId" in op
    }


@pytest.mark.req("ORCH-DATA-0001")
def test_every_operation_of_both_planes_has_a_handler(settings_for: SettingsFactory) -> None:
    table = operations(Runtime(settings_for()))
    assert set(table) == operation_ids("data") | operation_ids("control")


@pytest.mark.req("ORCH-DATA-0001")
async def test_a_missing_handler_fails_start_up(settings_for: SettingsFactory) -> None:
    table = operations(Runtime(settings_for()))
    del table["cancelTask"]
    app = AsyncApp(__name__)
    app.add_api(dict(openapi("data")), resolver=OperationResolver(table))
    with pytest.raises(Exception) as raised:  # the cause is checked below
        async with LifespanManager(app):
            pass
    chain = []
    error: BaseException | None = raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    resolver_errors = [e for e in chain if isinstance(e, ResolverError)]
    assert resolver_errors and "cancelTask" in str(resolver_errors[0])
