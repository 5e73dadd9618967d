"""The Python client of both planes. It speaks HTTP to the contract and imports no server
module (import-linter holds it to that).

``Client`` blocks, ``AsyncClient`` is for asyncio; both take :class:`Options` and raise the
exceptions of :mod:`llorch.client.errors`.
"""

from llorch.client.aio import AsyncClient
from llorch.client.base import DEFAULT_URL, Options
from llorch.client.errors import (
    ApiError,
    AuthError,
    ClientError,
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    ProtocolError,
    ServerError,
    StreamFailed,
    TransportError,
    Unavailable,
)
from llorch.client.models import Artifact, Budgets, Page, PoolHealth, Session, Task, TaskAccepted
from llorch.client.sse import Event
from llorch.client.sync import Client

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "Artifact",
    "AsyncClient",
    "AuthError",
    "Budgets",
    "Client",
    "ClientError",
    "Conflict",
    "Event",
    "InvalidRequest",
    "NotFound",
    "Options",
    "Overloaded",
    "Page",
    "PoolHealth",
    "ProtocolError",
    "ServerError",
    "Session",
    "StreamFailed",
    "Task",
    "TaskAccepted",
    "TransportError",
    "Unavailable",
]
