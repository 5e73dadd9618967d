"""Handlers, bound by operationId. Each takes the validated arguments, calls one service and
returns body, status and headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llorch.api.handlers.sessions import SessionHandlers
from llorch.api.handlers.tasks import TaskHandlers
from llorch.api.runtime import Runtime


def operations(runtime: Runtime) -> dict[str, Callable[..., Any]]:
    tasks = TaskHandlers(runtime)
    sessions = SessionHandlers(runtime)
    return {
        "createTask": tasks.create_task,
        "listTasks": tasks.list_tasks,
        "getTask": tasks.get_task,
        "streamTask": tasks.stream_task,
        "cancelTask": tasks.cancel_task,
        "createSession": sessions.create_session,
        "getSession": sessions.get_session,
        "deleteSession": sessions.delete_session,
    }
