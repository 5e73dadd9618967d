"""The OpenAPI documents themselves: valid 3.0.3, and complete in the ways the specs demand."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate

from llorch.contracts import openapi

DOCUMENTS = ("data", "control")
METHODS = ("get", "post", "put", "patch", "delete")


def operations(name: str) -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for path, item in openapi(name)["paths"].items():
        for method in METHODS:
            if method in item:
                found.append((path, method, item[method]))
    return found


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


@pytest.mark.parametrize("name", DOCUMENTS)
def test_documents_are_valid_openapi_3_0_3(name: str) -> None:
    document = dict(openapi(name))
    assert document["openapi"] == "3.0.3"
    validate(document)


@pytest.mark.req("ORCH-DATA-0003", "ORCH-DATA-0002", "ORCH-ERR-0001")
@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_response_declares_the_correlation_id_and_errors_the_envelope(name: str) -> None:
    document = dict(openapi(name))
    for path, method, operation in operations(name):
        assert "400" in operation["responses"], (path, method)
        for status, response in operation["responses"].items():
            response = resolve(document, response)
            assert "X-Correlation-Id" in response.get("headers", {}), (path, method, status)
            if not status.startswith("2"):
                # The OpenAI facade's errors are OpenAI's error body (.specs/openai.md).
                error = "OaiError" if "openai" in operation.get("tags", ()) else "ErrorEnvelope"
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{error}"}, (path, status)


@pytest.mark.req("ORCH-ERR-0004")
@pytest.mark.parametrize("name", DOCUMENTS)
def test_429_and_503_declare_their_retry_headers(name: str) -> None:
    document = dict(openapi(name))
    for path, method, operation in operations(name):
        for status, response in operation["responses"].items():
            headers = resolve(document, response).get("headers", {})
            if status in ("429", "503"):
                assert "Retry-After" in headers, (path, method, status)
            if status == "429":
                assert "X-Backoff-Ms" in headers, (path, method, status)


def test_create_task_links_to_get_stream_and_cancel() -> None:
    [create] = [op for _, _, op in operations("data") if op["operationId"] == "createTask"]
    links = create["responses"]["202"]["links"]
    assert {link["operationId"] for link in links.values()} >= {
        "getTask",
        "streamTask",
        "cancelTask",
    }
