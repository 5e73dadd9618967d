"""Bearer-key authentication, scopes and per-key rate limits.

Keys are known only by the sha256 of their secret; a presented key is hashed and compared with
every configured digest in constant time (``hmac.compare_digest``), so neither the answer nor its
timing tells which key, or which prefix, came close. Each operation names the scopes that may call
it in its contract (``x-llorch-scopes``); an operation with ``security: []`` is public.

Connexion calls :meth:`AuthKeys.verify` from its security middleware (after routing, before
validation: a stranger's body is never parsed), through the handler class that
:func:`security_map` registers for the ``bearer`` scheme. The :class:`~llorch.scheduler.Caller` is
then in the request's connexion context, where handlers read it with :func:`caller` and pass it to
the service, which decides visibility by it::

    keys = AuthKeys(settings.auth.keys, clock, operation_scopes(documents))
    app.add_api(document, security_map=security_map(keys), ...)
    keys.replace([ApiKey(name="ci", scopes=("data",), sha256=digest)])  # at run time
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from connexion.context import context
from connexion.context import scope as connexion_scope
from connexion.lifecycle import ConnexionRequest
from starlette.datastructures import Headers

from llorch.clock import Clock
from llorch.config import SCOPES, ApiKey, RateLimit, Settings
from llorch.errors import BadToken, ForbiddenScope, MissingToken, RateLimited
from llorch.scheduler.caller import ANYONE, NOBODY, Caller

log = logging.getLogger("llorch.auth")

SCOPES_KEY = "x-llorch-scopes"
_CALLER = "llorch_caller"
_METHODS = ("get", "put", "post", "delete", "patch")


class TokenBucket:
    """``per_s`` requests a second on average, at most ``burst`` at once."""

    def __init__(self, rate: RateLimit, now_s: float) -> None:
        self._per_s = rate.per_s
        self._burst = float(rate.burst)
        self._tokens = float(rate.burst)
        self._at = now_s

    def take(self, now_s: float, share: int = 1) -> float:
        """Take one token: 0.0 when granted, otherwise the seconds until one is available.
        ``share``: how many instances enforce the key's limit together; this one allows
        ``per_s / share`` and a burst of ``burst / share`` (at least one request)."""
        per_s, burst = self._per_s / share, max(1.0, self._burst / share)
        self._tokens = min(burst, self._tokens + (now_s - self._at) * per_s)
        self._at = now_s
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / per_s


@dataclass(frozen=True)
class _Key:
    config: ApiKey
    digest: bytes


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def operation_scopes(documents: Iterable[Mapping[str, Any]]) -> dict[str, frozenset[str]]:
    """operationId -> the scopes that may call it (any of them), from ``x-llorch-scopes``."""
    found: dict[str, frozenset[str]] = {}
    for document in documents:
        for item in document.get("paths", {}).values():
            for method in _METHODS:
                operation = item.get(method)
                if operation is not None and SCOPES_KEY in operation:
                    found[operation["operationId"]] = frozenset(operation[SCOPES_KEY])
    return found


class AuthKeys:
    """The live key set. Empty means authentication is off (allowed on loopback binds only)."""

    def __init__(
        self, keys: Iterable[ApiKey], clock: Clock, scopes: Mapping[str, frozenset[str]]
    ) -> None:
        self._clock = clock
        self._scopes = dict(scopes)
        self._keys: tuple[_Key, ...] = ()
        self._buckets: dict[str, TokenBucket] = {}
        # How many instances share each key's rate limit (the live instances of a cluster,
        # ORCH-STATE-0053): each enforces its share of it.
        self.share: Callable[[], int] = lambda: 1
        self.replace(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        """Swap the whole key set at once (rate-limit state starts afresh)."""
        new = tuple(_Key(k, _digest(k)) for k in keys)
        names = [k.config.name for k in new]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate API key names in {sorted(names)}")
        self._keys = new
        now = self._clock.monotonic_s()
        self._buckets = {
            k.config.name: TokenBucket(k.config.rate_limit, now)
            for k in new
            if k.config.rate_limit is not None
        }

    def authenticate(self, authorization: str | None, operation_id: str | None) -> Caller:
        """The caller of ``operation_id`` given its Authorization header, or an AuthError."""
        if not self._keys:
            return ANYONE
        if not authorization:
            raise MissingToken("this operation needs an Authorization: Bearer <key> header")
        scheme, _, secret = authorization.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise MissingToken("the Authorization header is not of the form: Bearer <key>")
        presented = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        match: _Key | None = None
        for key in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(presented, key.digest):
                match = key
        if match is None:
            raise BadToken("the bearer key is not valid")
        config = match.config
        allowed = self._scopes.get(operation_id or "", frozenset(SCOPES))
        if not allowed & set(config.scopes):
            raise ForbiddenScope(
                f"key {config.name!r} lacks the scope this operation needs "
                f"(one of {sorted(allowed)})"
            )
        bucket = self._buckets.get(config.name)
        if bucket is not None:
            wait_s = bucket.take(self._clock.monotonic_s(), max(1, self.share()))
            if wait_s > 0:
                raise RateLimited(
                    f"key {config.name!r} is over its rate limit",
                    retry_after_ms=max(1, math.ceil(wait_s * 1000)),
                )
        return Caller(name=config.name, scopes=frozenset(config.scopes), budgets=config.budgets)

    def verify(self, request: ConnexionRequest) -> dict[str, Any]:
        """Connexion's security hook: the token info of an allowed request."""
        routing = request.scope.get("extensions", {}).get("connexion_routing", {})
        found = self.authenticate(request.headers.get("authorization"), routing.get("operation_id"))
        return {"sub": found.name, _CALLER: found}


def security_map(keys: AuthKeys) -> dict[str, type]:
    """Connexion's handler for the ``bearer`` scheme, bound to ``keys``."""

    class LlorchBearer:
        def get_fn(
            self, _scheme: Mapping[str, Any], _scopes: list[str]
        ) -> Callable[[ConnexionRequest], dict[str, Any]]:
            return keys.verify

    return {"bearer": LlorchBearer}


class _RequestHeaders(Mapping[str, str]):
    """The request's headers, parsed on first use: only a pool that names its fairness flows by
    a header reads them, and parsing them for every request cost ~3 % of an admission."""

    __slots__ = ("_headers", "_scope")

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        self._scope = scope
        self._headers: Headers | None = None

    def _parsed(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(scope=self._scope)
        return self._headers

    def __getitem__(self, key: str) -> str:
        return self._parsed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())


def caller() -> Caller:
    """The current request's caller, with the request's headers (a pool may name its fairness
    flows by a header). A request that skipped authentication (a public operation) sees
    nobody's resources."""
    token_info = context.get("token_info") or {}
    found = token_info.get(_CALLER)
    who = found if isinstance(found, Caller) else NOBODY
    headers = _RequestHeaders(connexion_scope._get_current_object())
    return Caller(name=who.name, scopes=who.scopes, budgets=who.budgets, headers=headers)


def scope_caller(keys: AuthKeys, scope: MutableMapping[str, Any], operation_id: str) -> Caller:
    """The caller of a request that connexion's security middleware does not see (the event
    stream's fast path, :mod:`llorch.api.stream_route`): the same :meth:`AuthKeys.authenticate`
    on the first ``Authorization`` header, and the same caller :func:`caller` would give."""
    authorization = next(
        (value.decode("latin-1") for key, value in scope["headers"] if key == b"authorization"),
        None,
    )
    who = keys.authenticate(authorization, operation_id)
    headers = _RequestHeaders(scope)
    return Caller(name=who.name, scopes=who.scopes, budgets=who.budgets, headers=headers)


def check_bind(settings: Settings) -> None:
    """Refuse a bind reachable from other hosts without keys; say loudly when auth is off."""
    if settings.auth.keys:
        return
    host = settings.server.host
    if not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host} without authentication: configure auth.keys, "
            "or bind a loopback address for development"
        )
    log.warning(
        "AUTHENTICATION IS OFF: no API keys are configured, so every request is allowed. "
        "This is the development mode of a loopback bind (%s); configure auth.keys before "
        "exposing this server.",
        host,
    )


def _digest(key: ApiKey) -> bytes:
    if key.sha256 is None:
        raise ValueError(f"API key {key.name!r} has no sha256 (its key_env or key_file is unread)")
    return bytes.fromhex(key.sha256)
