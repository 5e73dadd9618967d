"""The error envelope and its retry headers, as api.problems builds them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from llorch.api.middleware import correlation_id
from llorch.api.problems import STATUS, HttpErrors, domain_error, envelope_response
from llorch.contracts import openapi
from llorch.errors import AdmissionReject, BudgetExhausted, PoolUnready, StorageError


@pytest.fixture(autouse=True)
def request_id() -> Iterator[str]:
    token = correlation_id.set("c-42")
    yield "c-42"
    correlation_id.reset(token)


_JSON_TYPES = {"string": str, "boolean": bool, "integer": int}


def assert_envelope(body: dict[str, Any]) -> None:
    """The body matches the ErrorEnvelope schema of the contract (a flat object of scalars)."""
    schemas = openapi("data")["components"]["schemas"]
    envelope = schemas["ErrorEnvelope"]
    assert set(envelope["required"]) <= set(body)
    assert set(body) <= set(envelope["properties"])
    assert body["code"] in schemas["ErrorCode"]["enum"]
    for name, value in body.items():
        declared = envelope["properties"][name].get("type", "string")
        assert isinstance(value, _JSON_TYPES[declared]), (name, value)


def body_of(response: Any) -> dict[str, Any]:
    found: dict[str, Any] = orjson.loads(response.body)
    return found


@pytest.mark.req("ORCH-ERR-0001", "ORCH-ERR-0002", "ORCH-ERR-0004")
@pytest.mark.parametrize("code", sorted(STATUS))
def test_every_code_gets_its_status_a_valid_envelope_and_the_retry_headers(code: str) -> None:
    response = envelope_response(code, "something happened", retriable=False, pool_id="default")

    body = body_of(response)
    assert_envelope(body)
    assert response.status_code == STATUS[code]
    assert response.mimetype == "application/json"
    assert (body["code"], body["correlation_id"], body["pool_id"]) == (code, "c-42", "default")
    headers = response.headers
    if STATUS[code] in (429, 503):
        assert int(headers["Retry-After"]) >= 1
    else:
        assert "Retry-After" not in headers
    assert ("X-Backoff-Ms" in headers) is (STATUS[code] == 429)


@pytest.mark.req("ORCH-ERR-0004", "ORCH-DATA-0021")
def test_retry_after_is_whole_seconds_rounded_up_and_backoff_is_exact() -> None:
    error = AdmissionReject("queue full", retry_after_ms=1500, policy_label="reject")

    response = domain_error(None, error)

    assert response.status_code == 429
    assert response.headers == {"Retry-After": "2", "X-Backoff-Ms": "1500"}
    body = body_of(response)
    assert (body["retriable"], body["retry_after_ms"], body["policy_label"]) == (
        True,
        1500,
        "reject",
    )
    assert "engine" not in body


@pytest.mark.req("ORCH-ERR-0004")
def test_a_short_backoff_still_says_retry_after_one_second() -> None:
    response = domain_error(None, PoolUnready("no replica", retry_after_ms=200))

    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    assert body_of(response)["retry_after_ms"] == 200


@pytest.mark.req("ORCH-DATA-0080")
def test_budget_exhausted_is_a_429_that_is_not_retriable() -> None:
    error = BudgetExhausted("no tokens left", policy_label="tokens", retry_after_ms=300)

    response = domain_error(None, error)

    body = body_of(response)
    assert response.status_code == 429
    assert (body["code"], body["retriable"], body["policy_label"]) == (
        "BUDGET_EXHAUSTED",
        False,
        "tokens",
    )


@pytest.mark.req("ORCH-DATA-0019")
def test_a_storage_failure_is_an_internal_error_with_the_envelope() -> None:
    response = domain_error(None, StorageError("database is locked"))

    body = body_of(response)
    assert response.status_code == 500
    assert_envelope(body)
    assert (body["code"], body["retriable"]) == ("INTERNAL", True)


@pytest.mark.req("ORCH-ERR-0005")
def test_the_allow_list_of_a_405_comes_from_the_contract() -> None:
    errors = HttpErrors(openapi("data"), openapi("control"))

    assert errors.allow("/v1/tasks") == "GET, POST"
    assert errors.allow("/v1/tasks/t-1") == "GET"
    assert errors.allow("/v1/tasks/t-1/cancel") == "POST"
    assert errors.allow("/v1/sessions/s-1") == "DELETE, GET"
    assert errors.allow("/v1/pools/default/drain") is not None
    assert errors.allow("/v1/tasks/t-1/stream/extra") is None
    assert errors.allow("/nowhere") is None
