"""Secrets out of the parameters a trace artifact keeps.

>>> redact({"model": "m", "headers": {"Authorization": "Bearer x"}, "tools": [{"api_key": "k"}]})
{'model': 'm', 'headers': {'Authorization': '[REDACTED]'}, 'tools': [{'api_key': '[REDACTED]'}]}
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"

# A key is secret when its lower-cased name contains one of these (so also "x-api-key",
# "access_token", "Set-Cookie", "client_secret") ...
SECRET_WORDS = ("key", "token", "secret", "password", "authorization", "cookie")
# ... unless it names a count of tokens: these are usage, not credentials.
TOKEN_COUNTS = re.compile(r"^(max|min|num)_tokens?$|^tokens?_(in|out|remaining|per_s)$")


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``params``; the value of every secret-named key, at any depth, replaced."""
    return _mapping(params)


def _mapping(params: Mapping[Any, Any]) -> dict[Any, Any]:
    return {key: REDACTED if _is_secret(key) else _value(value) for key, value in params.items()}


def _value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _mapping(value)
    if isinstance(value, list):
        return [_value(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_value(item) for item in value)
    return copy.deepcopy(value)


def _is_secret(key: object) -> bool:
    if not isinstance(key, str) or TOKEN_COUNTS.match(key.lower()):
        return False
    return any(word in key.lower() for word in SECRET_WORDS)
