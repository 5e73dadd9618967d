"""The composition root: ``create_app(settings)`` wires the contract, the handlers and the runtime.

The request pipeline, outermost first:
  connexion's ServerErrorMiddleware
  → EdgeMiddleware      (X-Correlation-Id on every response, errors included; requests counted
                         by operationId and status, and logged; 413 before a large body is read)
  → StreamRoute         (GET /v1/tasks/{id}/stream when connexion would accept it as it is:
                         authenticated and answered here, below the rest; llorch.api.stream_route)
  → OpenAIErrors        (on the OpenAI facade's routes, the envelope becomes OpenAI's error body)
  → connexion's ExceptionMiddleware (our handlers: every error becomes the envelope)
  → routing → security (llorch.api.auth: bearer key, scope, rate limit)
  → ChunkedBodyMiddleware (a chunked body is read, within the limit, and given its length)
  → request validation (errors never quote the body) → response validation → lifespan
  → OperationMiddleware (tells the edge which operation matched; the correlation id again,
                         inside response validation, which checks the header)
  → handlers
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from connexion import AsyncApp
from connexion.exceptions import ProblemException
from connexion.middleware import MiddlewarePosition
from connexion.options import SwaggerUIOptions
from connexion.resolver import Resolver
from starlette.exceptions import HTTPException

from llorch.api import problems
from llorch.api.auth import check_bind, security_map
from llorch.api.decorated import DecoratedApi
from llorch.api.facade.errors import OpenAIErrors
from llorch.api.handlers import operations
from llorch.api.middleware import ChunkedBodyMiddleware, EdgeMiddleware, OperationMiddleware
from llorch.api.runtime import Runtime
from llorch.api.stream_route import StreamRoute
from llorch.api.validation import validator_map
from llorch.clock import Clock, SystemClock
from llorch.config import Settings
from llorch.contracts import openapi
from llorch.errors import LlorchError
from llorch.scheduler.service import EngineFactory


class OperationResolver(Resolver):  # type: ignore[misc]  # connexion ships no types
    """Binds each operationId to a handler; a missing handler fails start-up."""

    def __init__(self, table: dict[str, Callable[..., Awaitable[Any]]]) -> None:
        super().__init__(function_resolver=self._lookup)
        self._table = table

    def _lookup(self, operation_id: str) -> Callable[..., Awaitable[Any]]:
        try:
            return presigned(self._table[operation_id])
        except KeyError:
            raise ValueError(f"no handler for operationId {operation_id!r}") from None


def presigned(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``handler``, carrying its signature, computed once.

    Connexion decorates the handler anew on every request and asks ``inspect.signature`` which
    arguments it takes: ~10 µs for a bound method, under 1 µs for a function that carries
    ``__signature__``. The wrapper has no ``__wrapped__``, since connexion unwraps down to the
    innermost function before it asks.
    """
    signature = inspect.signature(handler)

    async def call(**kwargs: Any) -> Any:
        return await handler(**kwargs)

    call.__signature__ = signature  # type: ignore[attr-defined]
    call.__name__ = handler.__name__
    call.__qualname__ = handler.__qualname__
    call.__doc__ = handler.__doc__
    return call


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    engines: EngineFactory | None = None,
) -> AsyncApp:
    check_bind(settings)
    runtime = Runtime(settings, clock or SystemClock(), engines)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = AsyncApp(__name__, lifespan=lifespan)
    app._middleware_app.api_cls = DecoratedApi  # handlers decorated once (llorch.api.decorated)
    _add_middleware(app, settings, runtime)
    resolver = OperationResolver(operations(runtime))
    documents = [dict(openapi("data")), dict(openapi("control"))]
    for name, document in zip(("data", "control"), documents, strict=True):
        app.add_api(
            document,
            name=name,
            resolver=resolver,
            strict_validation=True,
            validate_responses=True,
            pythonic_params=False,
            security_map=security_map(runtime.auth),
            validator_map=validator_map(),
            swagger_ui_options=SwaggerUIOptions(
                serve_spec=settings.auth.serves_docs, swagger_ui=settings.auth.serves_docs
            ),
        )
    app.add_error_handler(LlorchError, problems.domain_error)
    app.add_error_handler(ProblemException, problems.problem)
    app.add_error_handler(HTTPException, problems.HttpErrors(*documents))
    app.add_error_handler(UnicodeDecodeError, problems.bad_encoding)
    app.add_error_handler(Exception, problems.unexpected)
    app.runtime = runtime  # for tests and the CLI
    return app


def _add_middleware(app: AsyncApp, settings: Settings, runtime: Runtime) -> None:
    """The edge (limits, metrics, logs), the event stream's fast path and the error envelope
    around connexion's own stack."""
    app.add_middleware(
        EdgeMiddleware,
        position=MiddlewarePosition.BEFORE_EXCEPTION,
        metrics=runtime.metrics,
        max_body_bytes=settings.server.max_body_bytes,
        # An artifact's JSON body may escape its content to six times its size (\u0001), plus
        # the rest of the request; but a body that cannot decode to content within
        # artifacts.max_bytes (and the rest) is refused as it streams in, never parsed.
        limits={"/v1/artifacts": 6 * settings.artifacts.max_bytes + settings.server.max_body_bytes},
        decoded_limits={
            "/v1/artifacts": settings.artifacts.max_bytes + settings.server.max_body_bytes
        },
    )
    # Inserted after EdgeMiddleware at the same position, these sit between it and the exception
    # middleware: the event stream's fast path first (what it does not serve goes on to
    # connexion), then OpenAIErrors, which sees every error answer as the envelope.
    app.add_middleware(StreamRoute, position=MiddlewarePosition.BEFORE_EXCEPTION, runtime=runtime)
    app.add_middleware(OpenAIErrors, position=MiddlewarePosition.BEFORE_EXCEPTION)
    app.add_middleware(ChunkedBodyMiddleware, position=MiddlewarePosition.BEFORE_VALIDATION)
    app.add_middleware(OperationMiddleware, position=MiddlewarePosition.BEFORE_CONTEXT)
