"""Connexion's operations, each with its handler decorated once rather than on every request.

Connexion's ``AsyncOperation`` builds a ``StarletteDecorator`` for every request, wraps the
handler in it (the parameter and response decorators: four ``functools.wraps`` and an
``inspect`` of the handler), builds a URI parser from the operation's parameters and body
definition, and gives the request the context's ``scope`` and ``receive`` as werkzeug proxies,
through which every header and body read then goes. None of that depends on the request: the
decorators read it from connexion's context when they run, and a URI parser keeps no state.
:class:`DecoratedOperation` does each once per operation and gives the request the ``scope``
and ``receive`` the operation is called with (those the context holds: connexion's context
middleware sets them just outside). The decorators, the parameter handling and the response
building are connexion's own, unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from connexion.apps.asynchronous import AsyncApi, AsyncOperation
from connexion.decorators import StarletteDecorator
from connexion.lifecycle import ConnexionRequest
from connexion.operations import AbstractOperation
from connexion.uri_parsing import AbstractURIParser
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class DecoratedOperation(AsyncOperation):  # type: ignore[misc]  # connexion ships no types
    def __init__(self, operation: AbstractOperation, **kwargs: Any) -> None:
        super().__init__(operation.function, operation_id=operation.operation_id, **kwargs)
        decorator = StarletteDecorator(
            pythonic_params=self.pythonic_params, jsonifier=self.jsonifier
        )
        # What connexion's decorator builds around the handler for each request.
        self._decorated: Callable[[ConnexionRequest], Awaitable[Response]] = decorator.decorate(
            self._fn
        )
        parser_class = decorator.uri_parser_class or operation.uri_parser_class
        self._uri_parser: AbstractURIParser = parser_class(
            operation.parameters, operation.body_definition()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = ConnexionRequest(scope, receive, uri_parser=self._uri_parser)
        response = await self._decorated(request)
        await response(scope, receive, send)


class DecoratedApi(AsyncApi):  # type: ignore[misc]
    def make_operation(self, operation: AbstractOperation) -> DecoratedOperation:
        return DecoratedOperation(
            operation, pythonic_params=self.pythonic_params, jsonifier=self.jsonifier
        )
