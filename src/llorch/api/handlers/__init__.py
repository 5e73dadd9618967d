"""Handlers, bound by operationId. Each takes the validated arguments, calls one service and
returns body, status and headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llorch.api.handlers.artifacts import ArtifactHandlers
from llorch.api.handlers.control import ControlHandlers
from llorch.api.handlers.openai import OpenAIHandlers
from llorch.api.handlers.sessions import SessionHandlers
from llorch.api.handlers.tasks import TaskHandlers
from llorch.api.runtime import Runtime


def operations(runtime: Runtime) -> dict[str, Callable[..., Any]]:
    tasks = TaskHandlers(runtime)
    sessions = SessionHandlers(runtime)
    control = ControlHandlers(runtime)
    artifacts = ArtifactHandlers(runtime)
    facade = OpenAIHandlers(runtime)
    return {
        "createTask": tasks.create_task,
        "listTasks": tasks.list_tasks,
        "getTask": tasks.get_task,
        "streamTask": tasks.stream_task,
        "cancelTask": tasks.cancel_task,
        "createSession": sessions.create_session,
        "getSession": sessions.get_session,
        "deleteSession": sessions.delete_session,
        "getCapabilities": control.get_capabilities,
        "listPools": control.list_pools,
        "getPoolHealth": control.get_pool_health,
        "drainPool": control.drain_pool,
        "resumePool": control.resume_pool,
        "reloadPool": control.reload_pool,
        "livez": control.livez,
        "readyz": control.readyz,
        "getMetrics": control.get_metrics,
        "createArtifact": artifacts.create_artifact,
        "getArtifact": artifacts.get_artifact,
        "listArtifacts": artifacts.list_artifacts,
        "createChatCompletion": facade.create_chat_completion,
        "createCompletion": facade.create_completion,
        "listModels": facade.list_models,
        "getModel": facade.get_model,
    }
