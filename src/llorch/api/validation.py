"""Connexion's request and response validators, made cheap per request, with redacted errors.

Redaction: connexion's JSON body validator puts jsonschema's message in the 400 and in an info
log line, and that message quotes the offending value: a prompt too long would come back in the
error and land in the logs. Our body validator names the place and the rule broken, never the
value.

Cost: connexion builds a jsonschema validator for every body and every parameter of every
request (~60 µs for a task submission and its 202). Here each schema is compiled once, by
``jsonschema_rs`` (Rust), and the Python validator connexion would have used is kept beside it.
The Rust validator only ever says "valid": when it rejects an instance (or cannot judge it: an
integer beyond 64 bits, a lone surrogate), the Python validator decides and writes the error,
so what is accepted, what is refused and every error message stay exactly connexion's. Schemas
the two could judge differently (``format``, ``writeOnly``) are left to the Python validator.

OpenAPI 3.0's ``nullable: true`` is no JSON Schema keyword: connexion's body and response
validators let ``null`` through that schema's ``type`` and ``enum``. Rust is given the same rule
written in JSON Schema (``"null"`` added to that ``type`` and that ``enum``); without it, every
response with a null field (most task rows) went to the Python validator.

Strict JSON: every request body is parsed by :func:`strict_json`, which refuses what Python's
parser admits beyond RFC 8259 (``NaN``, ``Infinity``) and what would make a later step fail
(nesting past :data:`MAX_JSON_DEPTH`, which validation walks recursively; integers past the
interpreter's digit limit), each as a 400 before the body is validated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import jsonschema_rs
from connexion.datastructures import MediaTypeDict
from connexion.exceptions import BadRequestProblem
from connexion.json_schema import Draft4RequestValidator, Draft4ResponseValidator
from connexion.utils import is_null, is_nullable
from connexion.validators import (
    VALIDATOR_MAP,
    JSONRequestBodyValidator,
    JSONResponseBodyValidator,
    ParameterValidator,
)
from jsonschema import Draft4Validator, ValidationError
from jsonschema.protocols import Validator

log = logging.getLogger("llorch.api")

# Keywords whose message names properties (keys of the schema), never a value of the request.
_SAFE_MESSAGES = frozenset({"required", "additionalProperties"})
_MAX_RULE_CHARS = 120

# Keywords on which jsonschema_rs and connexion's Draft 4 validators may disagree in the unsafe
# direction (Rust accepting what Python refuses): formats are checked by different code, and
# connexion's response validator refuses any property marked write-only.
_PYTHON_ONLY_KEYWORDS = frozenset({"format", "writeOnly", "x-writeOnly"})
# The validators that let null through a nullable schema's type and enum (connexion's
# allow_nullable); the parameter validator (plain Draft 4) does not.
_NULLABLE_AWARE = (Draft4RequestValidator, Draft4ResponseValidator)
# Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas.
_SUBSCHEMA = frozenset({"items", "additionalProperties", "not"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "items"})
_SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "definitions"})
# Connexion hands the same schema dict for an operation on every request; a bound keeps a schema
# built afresh per request (none today) from growing the cache.
_MAX_CACHED = 1024


def describe(error: ValidationError) -> str:
    """``'<path>': <rule>`` for a validation error, without the instance."""
    where = ".".join(str(part) for part in error.absolute_path) or "body"
    if error.validator in _SAFE_MESSAGES:
        return f"{error.message} - '{where}'" if where != "body" else str(error.message)
    rule = repr(error.validator_value)
    if len(rule) > _MAX_RULE_CHARS:
        rule = rule[:_MAX_RULE_CHARS] + "…"
    return f"'{where}' does not satisfy {error.validator}: {rule}"


def describe_parameter(error: ValidationError, parameter_type: str, name: str) -> str:
    """``<type> parameter '<name>' does not satisfy <rule>``, without the value."""
    where = ".".join(str(part) for part in error.absolute_path)
    rule = repr(error.validator_value)
    if len(rule) > _MAX_RULE_CHARS:
        rule = rule[:_MAX_RULE_CHARS] + "…"
    place = f"{name}.{where}" if where else name
    return f"{parameter_type} parameter '{place}' does not satisfy {error.validator}: {rule}"


class CompiledSchema:
    """One schema compiled twice: a Rust fast path and the Python validator that decides."""

    def __init__(self, schema: dict[str, Any], python_cls: Callable[..., Validator]) -> None:
        self.python = python_cls(schema, format_checker=Draft4Validator.FORMAT_CHECKER)
        self.fast: jsonschema_rs.Validator | None = None
        if not _mentions(schema, _PYTHON_ONLY_KEYWORDS):
            rust_schema = with_null(schema) if python_cls in _NULLABLE_AWARE else schema
            try:
                self.fast = jsonschema_rs.Draft4Validator(rust_schema, offline=True)
            except Exception:  # a schema Rust cannot compile (e.g. a Python-only regex)
                log.debug("schema left to the Python validator", exc_info=True)

    def surely_valid(self, instance: Any) -> bool:
        """True only when the instance is valid; False means "ask the Python validator"."""
        if self.fast is None:
            return False
        try:
            return self.fast.is_valid(instance)
        except Exception:  # not representable for Rust: big integers, lone surrogates
            return False


class SchemaCache:
    """Compiled schemas by schema object (kept alive here, so an id is never reused)."""

    def __init__(self, python_cls: Callable[..., Validator]) -> None:
        self._python_cls = python_cls
        self._compiled: dict[int, tuple[dict[str, Any], CompiledSchema]] = {}

    def get(self, schema: dict[str, Any]) -> CompiledSchema:
        found = self._compiled.get(id(schema))
        if found is not None and found[0] is schema:
            return found[1]
        compiled = CompiledSchema(schema, self._python_cls)
        if len(self._compiled) < _MAX_CACHED:
            self._compiled[id(schema)] = (schema, compiled)
        return compiled


MAX_JSON_DEPTH = 64


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not a JSON number")


def _depth(document: Any) -> int:
    """How deeply ``document``'s arrays and objects nest, found without recursion."""
    deepest, pending = 0, [(document, 1)]
    while pending:
        value, depth = pending.pop()
        children = value.values() if isinstance(value, dict) else value
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                pending.extend((child, depth + 1) for child in children)
    return deepest


def strict_json(text: str) -> Any:
    """``text`` parsed as RFC 8259 JSON, or a 400 that says what is wrong with it."""
    try:
        document = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise BadRequestProblem(detail="request body nests too deeply") from None
    except ValueError as exc:  # a decode error, a non-JSON constant, an integer too long
        raise BadRequestProblem(detail=f"request body is not JSON: {str(exc)[:200]}") from None
    if _depth(document) > MAX_JSON_DEPTH:
        raise BadRequestProblem(
            detail=f"request body nests deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    return document


class RedactingJSONRequestBodyValidator(JSONRequestBodyValidator):  # type: ignore[misc]
    schemas = SchemaCache(Draft4RequestValidator)

    async def _parse(self, stream: AsyncIterator[bytes], scope: Any) -> Any:
        body = b"".join([chunk async for chunk in stream]).decode(self._encoding)
        return strict_json(body) if body else None

    def _validate(self, body: Any) -> dict[str, Any] | None:
        if not self._nullable and body is None:
            raise BadRequestProblem("Request body must not be empty")
        compiled = self.schemas.get(self._schema)
        if compiled.surely_valid(body):
            return None
        try:
            compiled.python.validate(body)
        except ValidationError as exc:
            detail = describe(exc)
            log.info("request body rejected: %s", detail, extra={"validator": "body"})
            raise BadRequestProblem(detail=detail) from None
        return None


class CachedJSONResponseBodyValidator(JSONResponseBodyValidator):  # type: ignore[misc]
    """Connexion's response body validator over a compiled schema; its errors unchanged."""

    schemas = SchemaCache(Draft4ResponseValidator)

    @property
    def validator(self) -> Validator:
        return self.schemas.get(self._schema).python

    def _validate(self, body: Any) -> None:
        if self.schemas.get(self._schema).surely_valid(body):
            return
        super()._validate(body)


class CachedParameterValidator(ParameterValidator):  # type: ignore[misc]
    """Connexion's parameter validator with each parameter's schema compiled once."""

    schemas = SchemaCache(Draft4Validator)

    def validate(self, scope: dict[str, Any]) -> None:
        # No parameters declared and none sent: connexion would check nothing.
        if not self.parameters and not scope.get("query_string"):
            return
        super().validate(scope)

    @classmethod
    def validate_parameter(
        cls, parameter_type: str, value: Any, param: dict[str, Any], param_name: str | None = None
    ) -> str | None:
        # connexion.validators.ParameterValidator.validate_parameter, without its per-call
        # deepcopy and validator construction.
        if is_nullable(param) and is_null(value):
            return None
        if _holds_nul(value):
            # No identifier, state, tag or cursor holds one, and PostgreSQL's text cannot.
            return (
                f"{parameter_type} parameter '{param_name or param['name']}' holds a NUL character"
            )
        if value is not None:
            compiled = cls.schemas.get(param.get("schema", param))
            if compiled.surely_valid(value):
                return None
            try:
                compiled.python.validate(value)
            except ValidationError as exception:
                # Connexion answers str(exception), which quotes the value twice: a 500 KB
                # header came back as a 1 MB 400. Name the parameter and the rule instead.
                return describe_parameter(exception, parameter_type, param_name or param["name"])
            return None
        if param.get("required"):
            return f"Missing {parameter_type} parameter '{param['name']}'"
        return None


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    return isinstance(value, list) and any(isinstance(v, str) and "\x00" in v for v in value)


def with_null(schema: Any) -> Any:
    """``schema`` with connexion's nullable rule in JSON Schema: in every (sub)schema that is
    ``nullable`` (or ``x-nullable: true``), ``"null"`` joins its ``type`` and its ``enum``.
    The other keywords are left alone: connexion applies them to null as well."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: with_null(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [with_null(sub) for sub in value]
        elif key in _SUBSCHEMA:
            out[key] = with_null(value)
    if schema.get("x-nullable") is True or schema.get("nullable"):
        kind = schema.get("type")
        if isinstance(kind, str) and kind != "null":
            out["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            out["type"] = [*kind, "null"]
        enum = schema.get("enum")
        if isinstance(enum, list) and None not in enum:
            out["enum"] = [*enum, None]
    return out


def _mentions(schema: Any, keywords: frozenset[str]) -> bool:
    """Whether any mapping in ``schema`` has one of ``keywords`` as a key."""
    stack = [schema]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            if not keywords.isdisjoint(node):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


class CachedMediaTypeDict(MediaTypeDict):  # type: ignore[misc]
    """Connexion's ``MediaTypeDict``, its answer per media type kept.

    Connexion looks up the body and the response validator of every request here, and each
    lookup sorts the keys and ``fnmatch``-es the media type against them (~20 µs a request).
    The answer for a media type only changes with the keys, so a change clears what is kept.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._found: dict[str, Any] = {}

    def __getitem__(self, item: str) -> Any:
        try:
            return self._found[item]
        except KeyError:
            value = super().__getitem__(item)
            self._found[item] = value
            return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._found.clear()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._found.clear()
        super().__delitem__(key)


def validator_map() -> dict[str, Any]:
    """Connexion's validators, with the JSON body, JSON response and parameter validators
    replaced; the compiled schemas live as long as the API the map is given to."""

    class Body(RedactingJSONRequestBodyValidator):
        schemas = SchemaCache(Draft4RequestValidator)

    class Response(CachedJSONResponseBodyValidator):
        schemas = SchemaCache(Draft4ResponseValidator)

    class Parameter(CachedParameterValidator):
        schemas = SchemaCache(Draft4Validator)

    body = CachedMediaTypeDict(dict(VALIDATOR_MAP["body"]))
    body["*/*json"] = Body
    response = CachedMediaTypeDict(dict(VALIDATOR_MAP["response"]))
    response["*/*json"] = Response
    return {"body": body, "response": response, "parameter": Parameter}
