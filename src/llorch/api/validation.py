"""Request-body validation whose errors never repeat what the client sent.

Connexion's JSON body validator puts jsonschema's message in the 400 and in an info log line, and
that message quotes the offending value: a prompt too long would come back in the error and land
in the logs. This validator names the place and the rule broken, never the value.
"""

from __future__ import annotations

import logging
from typing import Any

from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem
from connexion.validators import VALIDATOR_MAP, JSONRequestBodyValidator
from jsonschema import ValidationError

log = logging.getLogger("llorch.api")

# Keywords whose message names properties (keys of the schema), never a value of the request.
_SAFE_MESSAGES = frozenset({"required", "additionalProperties"})
_MAX_RULE_CHARS = 120


def describe(error: ValidationError) -> str:
    """``'<path>': <rule>`` for a validation error, without the instance."""
    where = ".".join(str(part) for part in error.absolute_path) or "body"
    if error.validator in _SAFE_MESSAGES:
        return f"{error.message} - '{where}'" if where != "body" else str(error.message)
    rule = repr(error.validator_value)
    if len(rule) > _MAX_RULE_CHARS:
        rule = rule[:_MAX_RULE_CHARS] + "…"
    return f"'{where}' does not satisfy {error.validator}: {rule}"


class RedactingJSONRequestBodyValidator(JSONRequestBodyValidator):  # type: ignore[misc]
    def _validate(self, body: Any) -> dict[str, Any] | None:
        if not self._nullable and body is None:
            raise BadRequestProblem("Request body must not be empty")
        try:
            result: dict[str, Any] | None = self._validator.validate(body)
        except ValidationError as exc:
            detail = describe(exc)
            log.info("request body rejected: %s", detail, extra={"validator": "body"})
            raise BadRequestProblem(detail=detail) from None
        return result


def validator_map() -> dict[str, Any]:
    """Connexion's validators, with the JSON body validator replaced."""
    body = MediaTypeDict(dict(VALIDATOR_MAP["body"]))
    body["*/*json"] = RedactingJSONRequestBodyValidator
    return {"body": body}
