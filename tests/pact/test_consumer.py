"""Consumer tests: the real client against pact's mock server, one interaction per scenario.

A complete run writes `contracts/pacts/llorch-cli-llorch.json`, which `xtask.py pact-verify`
verifies against the real server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llorch.client import ApiError, Client, Options
from pact import Pact, generate, match
from tests.pact.scenarios import NOT_IN_PACT, SCENARIOS, Scenario
from tests.plugins.status_recorder import declared

pytestmark = pytest.mark.contract

_RETRIABLE = {
    "RATE_LIMITED",
    "ADMISSION_REJECT",
    "INTERNAL",
    "POOL_UNAVAILABLE",
    "RELOAD_IN_PROGRESS",
    "NOT_READY",
    "STORAGE_UNAVAILABLE",
}


def _from_state(example: str, expression: str) -> Any:
    return match.like(example, generator=generate.provider_state(expression))


def build(pact: Pact, s: Scenario) -> None:
    op = s.op
    path: Any = op.path if s.path_from_state is None else _from_state(op.path, s.path_from_state)
    interaction = (
        pact.upon_receiving(s.description)
        .given(s.state, s.params or None)
        .with_request(op.method, path)
    )
    for name, value in op.params.items():
        interaction.with_query_parameter(name, str(value))
    if s.api_key is not None:
        interaction.with_header("Authorization", f"Bearer {s.api_key}")
    if op.content is not None:
        interaction.with_body(op.content.decode(), content_type=op.headers["Content-Type"])
    elif op.json is not None:
        body = dict(op.json)
        for field, expression in s.body_from_state.items():
            body[field] = _from_state(str(body[field]), expression)
        interaction.with_body(body, content_type="application/json")
    interaction.will_respond_with(s.status)
    interaction.with_header("X-Correlation-Id", match.str("c-1"))
    for name, value in s.headers.items():
        interaction.with_header(name, value)
    if s.code is not None:
        envelope = {
            "code": s.code,
            "message": match.str("a message for people"),
            "retriable": match.bool(s.code in _RETRIABLE),
            "correlation_id": match.str("c-1"),
        }
        interaction.with_body(envelope, content_type="application/json")
    elif s.body is not None:
        interaction.with_body(s.body, content_type=s.content_type)
    if s.body_regex is not None:
        regex = {"match": "regex", "regex": s.body_regex}
        rules = {"body": {"$": {"combine": "AND", "matchers": [regex]}}}
        interaction.with_matching_rules(rules, "Response")


def exercise(s: Scenario, url: str) -> None:
    """What the CLI does for this operation, through the real client."""
    with Client(Options(base_url=url, api_key=s.api_key)) as client:
        if s.stream:
            task_id = s.op.path.split("/")[3]
            events = list(client.events(task_id))
            assert [e.event for e in events].count("started") == int(s.started)
            assert events[-1].terminal and not any(e.terminal for e in events[:-1])
            return
        if s.code is None:
            client.call(s.op)
            return
        with pytest.raises(ApiError) as raised:
            client.call(s.op)
        assert (raised.value.status, raised.value.code) == (s.status, s.code)
        if s.status in (429, 503):
            assert raised.value.retry_after_s is not None


@pytest.mark.req("ORCH-CLI-0020")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: f"{s.op.operation_id}-{s.status}")
def test_interaction(scenario: Scenario, pact_dir: Path) -> None:
    pact = Pact("llorch-cli", "llorch").with_specification("V4")
    build(pact, scenario)
    with pact.serve() as server:
        exercise(scenario, str(server.url).rstrip("/"))
    pact.write_file(pact_dir)


@pytest.mark.req("ORCH-CLI-0020")
def test_every_declared_status_has_an_interaction() -> None:
    pairs = {(s.op.operation_id, s.status) for s in SCENARIOS}
    # What the pact leaves out is listed, with the test or reason that covers it, in
    # NOT_IN_PACT; every other declared status is an interaction.
    assert sorted(declared() - pairs - set(NOT_IN_PACT)) == []
    assert sorted(set(NOT_IN_PACT) - declared()) == []
