"""Redacting the secrets out of the parameters kept in trace artifacts."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llorch.artifacts import redact
from llorch.artifacts.redact import REDACTED


@pytest.mark.req("ORCH-CTRL-0026")
def test_secret_keys_are_redacted_at_any_depth_and_in_lists() -> None:
    params: dict[str, Any] = {
        "model": "mock-small",
        "api_key": "sk-1",
        "headers": {"Authorization": "Bearer abc", "Accept": "text/event-stream"},
        "tools": [
            {"name": "search", "auth": {"access_token": "t0k", "scope": "read"}},
            [{"client_secret": "s"}, "plain", 3],
        ],
        "db": {"user": "llorch", "PassWord": "hunter2"},
    }

    assert redact(params) == {
        "model": "mock-small",
        "api_key": REDACTED,
        "headers": {"Authorization": REDACTED, "Accept": "text/event-stream"},
        "tools": [
            {"name": "search", "auth": {"access_token": REDACTED, "scope": "read"}},
            [{"client_secret": REDACTED}, "plain", 3],
        ],
        "db": {"user": "llorch", "PassWord": REDACTED},
    }


@pytest.mark.req("ORCH-CTRL-0026")
@pytest.mark.parametrize(
    "key",
    [
        "key",
        "API_KEY",
        "x-api-key",
        "apiKey",
        "Token",
        "refresh_token",
        "SECRET",
        "password",
        "authorization",
        "Proxy-Authorization",
        "Cookie",
        "Set-Cookie",
    ],
)
def test_key_names_match_case_insensitively_as_substrings(key: str) -> None:
    assert redact({key: "value", "other": "value"}) == {key: REDACTED, "other": "value"}


def test_the_whole_value_of_a_secret_key_is_replaced_whatever_its_type() -> None:
    params: dict[str, Any] = {"cookies": {"a": "1"}, "tokens": ["x", "y"], "secret": None, "key": 7}

    assert redact(params) == {
        "cookies": REDACTED,
        "tokens": REDACTED,
        "secret": REDACTED,
        "key": REDACTED,
    }


def test_other_values_are_unchanged_and_the_input_is_not_mutated() -> None:
    params: dict[str, Any] = {
        "prompt": "my password is in the prompt, not in a key",
        "seed": 7,
        "temperature": 0.5,
        "stop": ["\n\n", "END"],
        "stream": True,
        "placement": None,
        "nested": {"deep": {"deeper": [{"token": "t", "keep": [1, 2]}]}},
        "by_index": {1: "a non-string key", 2: ["two"]},
    }
    before = copy.deepcopy(params)

    redacted = redact(params)

    assert params == before
    assert redacted["prompt"] == params["prompt"]
    assert redacted["nested"] == {"deep": {"deeper": [{"token": REDACTED, "keep": [1, 2]}]}}
    assert {k: v for k, v in redacted.items() if k != "nested"} == {
        k: v for k, v in params.items() if k != "nested"
    }
    # A deep copy: changing the result reaches nothing in the input.
    redacted["stop"].append("more")
    redacted["nested"]["deep"]["deeper"][0]["keep"].append(3)
    assert params == before
    assert redacted["stop"] is not params["stop"]


def test_an_empty_mapping_stays_empty() -> None:
    assert redact({}) == {}


def test_token_counts_are_usage_not_secrets() -> None:
    params = {"max_tokens": 64, "tokens_out": 3, "access_token": "t", "tokens": ["x"]}
    assert redact(params) == {
        "max_tokens": 64,
        "tokens_out": 3,
        "access_token": REDACTED,
        "tokens": REDACTED,
    }
