"""The compiled validators judge like connexion's own, message for message.

Connexion builds a Draft 4 validator per request; ours compile each schema once and ask
jsonschema_rs first. Every case below is judged by both; the answers (accepted, or the exact
error) must be equal, including the cases where Rust and Python disagree (Rust refuses more,
and Python then decides).
"""

from __future__ import annotations

from typing import Any

import pytest
from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem, NonConformingResponseBody
from connexion.json_schema import Draft4RequestValidator, Draft4ResponseValidator, resolve_refs
from connexion.validators import JSONResponseBodyValidator, ParameterValidator
from jsonschema import Draft4Validator, ValidationError

from llorch.api.validation import CachedMediaTypeDict, CompiledSchema, describe, validator_map
from llorch.contracts import openapi

SPEC: dict[str, Any] = resolve_refs(dict(openapi("data")))
SCHEMAS: dict[str, Any] = SPEC["components"]["schemas"]
OK = {"model": "mock-small", "prompt": "hi", "max_tokens": 8}

REQUEST_BODIES: list[Any] = [
    OK,
    {**OK, "messages": [{"role": "user", "content": "hi"}]},  # oneOf: both
    {"model": "mock-small", "max_tokens": 8},  # oneOf: neither
    {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    {**OK, "max_tokens": 1.0},  # a float is no Draft 4 integer
    {**OK, "max_tokens": True},
    {**OK, "max_tokens": 0},
    {**OK, "max_tokens": 10**30},  # beyond 64 bits: Rust cannot judge it
    {**OK, "temperature": float("nan")},  # Python accepts NaN against a maximum, Rust does not
    {**OK, "temperature": 2.0000001},
    {**OK, "prompt": "\ud800"},  # a lone surrogate: Rust cannot take it
    {**OK, "prompt": "é" * 100_000},  # maxLength counts characters
    {**OK, "prompt": "é" * 100_001},
    {**OK, "task_id": "abc\n"},  # Python's `$` matches before a final newline, Rust's does not
    {**OK, "task_id": "-abc"},
    {**OK, "unknown": 1},
    {**OK, "stop": ["a"] * 9},
    {**OK, "priority": "urgent"},
    {**OK, "placement": {"prefer_pools": ["a"], "extra": 1}},
    {**OK, "model": None},
    {**OK, "seed": 4294967296},
    [],
    "text",
    None,
]


def _reference_request(schema: dict[str, Any], body: Any) -> str | None:
    validator = Draft4RequestValidator(schema, format_checker=Draft4Validator.FORMAT_CHECKER)
    try:
        validator.validate(body)
    except ValidationError as exc:
        return describe(exc)
    return None


@pytest.mark.parametrize("body", REQUEST_BODIES, ids=range(len(REQUEST_BODIES)))
def test_a_request_body_is_judged_like_connexion(body: Any) -> None:
    schema = SCHEMAS["TaskRequest"]
    ours = validator_map()["body"]["application/json"](
        schema=schema, required=True, nullable=False, encoding="utf-8", strict_validation=True
    )
    got: str | None = None
    try:
        ours._validate(body)
    except BadRequestProblem as exc:
        got = exc.detail
    expected = "Request body must not be empty" if body is None else None
    assert got == (expected or _reference_request(schema, body))


RESPONSE_BODIES: list[Any] = [
    {
        "task_id": "t-1",
        "session_id": "s-1",
        "state": "queued",
        "pool_id": "default",
        "queue_position": 0,
        "predicted_start_ms": 1,
        "backoff_ms": 0,
        "streams": {"sse": "/v1/tasks/t-1/stream"},
    },
    {"task_id": "t-1"},
    {"task_id": 1, "state": "lost"},
]


def _response_error(validator: Any, body: Any) -> str | None:
    try:
        validator._validate(body)
    except NonConformingResponseBody as exc:
        detail: str = exc.detail
        return detail
    return None


@pytest.mark.parametrize("body", RESPONSE_BODIES, ids=range(len(RESPONSE_BODIES)))
def test_a_response_body_is_judged_like_connexion(body: Any) -> None:
    schema = SCHEMAS["TaskAccepted"]
    options = {"schema": schema, "nullable": False, "encoding": "utf-8"}
    ours = validator_map()["response"]["application/json"]({}, **options)
    theirs = JSONResponseBodyValidator({}, **options)
    assert _response_error(ours, body) == _response_error(theirs, body)


TASK: dict[str, Any] = {
    "task_id": "t-1",
    "session_id": "s-1",
    "model": "mock-small",
    "priority": "interactive",
    "state": "running",
    "queue_position": None,
    "pool_id": "default",
    "replica_id": None,
    "finish_reason": None,
    "usage": {"tokens_in": 1, "tokens_out": 0, "cost": 0.0},
    "timings": {"created_ms": 1, "started_ms": None, "ended_ms": None, "ttft_ms": None},
    "trace_artifact_id": None,
}
# OpenAPI's nullable, through the fast path and through connexion's validator.
TASK_BODIES: list[Any] = [
    TASK,
    {**TASK, "finish_reason": "stop", "replica_id": "r-0", "queue_position": 3},
    {**TASK, "finish_reason": "bogus"},  # the enum still holds
    {**TASK, "queue_position": -1},  # and the minimum
    {**TASK, "model": None},  # not nullable
    {**TASK, "usage": None},
    {**TASK, "timings": {**TASK["timings"], "created_ms": None}},
    {**TASK, "error": None},  # a $ref beside no nullable: null is refused
]


@pytest.mark.parametrize("body", TASK_BODIES, ids=range(len(TASK_BODIES)))
def test_nullable_fields_are_judged_like_connexion(body: Any) -> None:
    schema = SCHEMAS["Task"]
    options = {"schema": schema, "nullable": False, "encoding": "utf-8"}
    ours = validator_map()["response"]["application/json"]({}, **options)
    theirs = JSONResponseBodyValidator({}, **options)
    assert _response_error(ours, body) == _response_error(theirs, body)


def test_a_task_with_null_fields_takes_the_fast_path() -> None:
    compiled = CompiledSchema(SCHEMAS["Task"], Draft4ResponseValidator)
    assert compiled.surely_valid(TASK)
    assert not compiled.surely_valid({**TASK, "model": None})
    # The plain Draft 4 validator of parameters knows no nullable.
    assert not CompiledSchema(SCHEMAS["Task"], Draft4Validator).surely_valid(TASK)


@pytest.mark.parametrize("value", [None, 1, 200, 201, 0, "7", 2.5, True])
def test_a_parameter_is_judged_like_connexion(value: Any) -> None:
    limit = next(p for p in SPEC["paths"]["/v1/tasks"]["get"]["parameters"] if p["name"] == "limit")
    ours = validator_map()["parameter"].validate_parameter("query", value, limit)
    theirs = ParameterValidator.validate_parameter("query", value, limit)
    # The same verdict; our message names the parameter and its rule, never the value.
    assert (ours is None) == (theirs is None)
    if ours is not None:
        assert ours.startswith("query parameter 'limit' does not satisfy ")
        assert repr(value) not in ours


@pytest.mark.parametrize("document", ["data", "control"])
def test_every_contract_schema_takes_the_fast_path(document: str) -> None:
    for name, schema in resolve_refs(dict(openapi(document)))["components"]["schemas"].items():
        assert CompiledSchema(schema, Draft4RequestValidator).fast is not None, name
    assert CompiledSchema(SCHEMAS["TaskRequest"], Draft4RequestValidator).surely_valid(OK)


def test_a_schema_with_a_format_is_left_to_python() -> None:
    schema = {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"}}}
    assert CompiledSchema(schema, Draft4RequestValidator).fast is None


def test_the_media_type_lookup_answers_like_connexions_and_sees_new_keys() -> None:
    plain = MediaTypeDict(
        {"*/*json": "json", "text/*": "text", "application/x-www-form-urlencoded": "form"}
    )
    cached = CachedMediaTypeDict(dict(plain))
    for media_type in ["application/json", "application/problem+json", "text/plain", "text/plain"]:
        assert cached[media_type] == plain[media_type]
    with pytest.raises(KeyError):
        cached["image/png"]
    cached["image/*"] = "image"
    cached["text/plain"] = "plain"
    assert (cached["image/png"], cached["text/plain"], cached["text/csv"]) == (
        "image",
        "plain",
        "text",
    )
