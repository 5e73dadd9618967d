"""Every interaction of the CLI's pact with the server: one per (operation, status) the two
documents declare, each made by the real client and named for the provider's real condition."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

from llorch.client import operations as ops
from llorch.client.operations import Operation
from pact import match

# The keys the provider-state route installs (llorch.api.provider_states).
PACT_KEY = "pact-key"
METRICS_ONLY_KEY = "pact-metrics-only"
DATA_ONLY_KEY = "pact-data-only"
NO_SCOPE_KEY = "pact-no-scope"
# The key each operation's 403 presents: one without any of the operation's scopes.
_SCOPE_KEY = {"getMetrics": DATA_ONLY_KEY, "getCapabilities": NO_SCOPE_KEY}

RUNNING = "the server is running"
FINISHED = "task t-finished has finished"
FAILED = "task t-failed failed mid-stream on pool broken"
WAITED = "task t-waited waited past the wait limit of pool waits"
SESSION = "session S exists"
NO_TOKENS = "session S has no tokens left"
ARTIFACT = "artifact A exists"
CORRUPT = "the stored body of artifact A no longer matches its digest"
DRAINING = "pool default is draining"
ADMITTING = "pool default is admitting"
SPARE_IDLE = "pool spare is idle"
SPARE_RELOADING = "pool spare is reloading a model that never becomes healthy"
FULL = "pool slow is full with policy reject"
NO_KEY = "the server requires an API key and the request has none"
BAD_KEY = "the server requires an API key and the request's key is unknown"
WRONG_SCOPE = "the request's API key lacks the operation's scope"
RATE_LIMITED = "the request's API key has spent its rate limit"
LOCKED = "another process holds the database's write lock"
ALL_DOWN = "every replica of every pool is down"

DOCUMENT = "You are a helpful assistant."
DOCUMENT_ID = "sha256:" + hashlib.sha256(DOCUMENT.encode()).hexdigest()
CORRUPT_DOC = "A body the disk will change."
CORRUPT_ID = "sha256:" + hashlib.sha256(CORRUPT_DOC.encode()).hexdigest()
MISSING_ID = "sha256:" + "0" * 64
EXAMPLE_SESSION = "s-0123456789abcdef"
TOO_LARGE = "x" * 3000  # above the verified server's body limit (2048 bytes)

INT = r"^[0-9]+$"
NUMBER = r"^[0-9]+(\.[0-9]+)?([eE]-?[0-9]+)?$"

_EVENT = r"id: [0-9]+\nevent: (token|metrics)\ndata: \{[^\n]*\}\n\n"
_STARTED = r"\A(: heartbeat\n\n)*id: 0\nevent: started\ndata: \{[^\n]*\}\n\n"
FINISHED_SSE = _STARTED + f"({_EVENT})+" + r"id: [0-9]+\nevent: end\ndata: \{[^\n]*\}\n\n\z"
FAILED_SSE = (
    _STARTED
    + f"({_EVENT})*"
    + r'id: [0-9]+\nevent: error\ndata: \{[^\n]*"code":"WORKER_RESET"[^\n]*\}\n\n\z'
)
# A task that never left its queue: its one frame is the terminal error.
WAITED_SSE = (
    r"\A(: heartbeat\n\n)*id: 0\nevent: error\n"
    r'data: \{[^\n]*"code":"QUEUE_TIMEOUT"[^\n]*"retriable":true[^\n]*\}\n\n\z'
)
WAITED_EXAMPLE = (
    'id: 0\nevent: error\ndata: {"code":"QUEUE_TIMEOUT","message":"waited 201 ms in the queue '
    'of pool waits, past its wait limit","retriable":true,"retry_after_ms":1000}\n\n'
)
FINISHED_EXAMPLE = (
    "id: 0\nevent: started\n"
    'data: {"task_id":"t-finished","queue_position":0,"pool_id":"default",'
    '"replica_id":"default-0","engine":"mock","kv_warmth":false,"correlation_id":"c-1"}\n\n'
    'id: 1\nevent: token\ndata: {"t":"Once","i":0}\n\n'
    'id: 2\nevent: end\ndata: {"tokens_in":4,"tokens_out":1,"ttft_ms":0,"decode_time_ms":0,'
    '"cost":0.0001,"finish_reason":"length"}\n\n'
)
FAILED_EXAMPLE = (
    "id: 0\nevent: started\n"
    'data: {"task_id":"t-failed","queue_position":0,"pool_id":"broken",'
    '"replica_id":"broken-0","engine":"mock","kv_warmth":false,"correlation_id":"c-1"}\n\n'
    'id: 1\nevent: token\ndata: {"t":"Once","i":0}\n\n'
    'id: 2\nevent: error\ndata: {"code":"WORKER_RESET","message":"replica broken-0 reset",'
    '"retriable":true}\n\n'
)

BUDGET_HEADERS = {
    "X-Budget-Tokens-Remaining": match.regex("199990", regex=INT),
    "X-Budget-Time-Remaining-Ms": match.regex("3600000", regex=INT),
    "X-Budget-Cost-Remaining": match.regex("9.99", regex=NUMBER),
}
RETRY_HEADERS = {"Retry-After": match.regex("2", regex=INT)}

_POOL = {
    "pool_id": "default",
    "live": True,
    "ready": True,
    "draining": False,
    "reloading": False,
    "engine": "mock",
    "model": "mock-small",
    "replicas": match.each_like(
        {"id": "default-0", "state": "ready", "slots_total": 4, "slots_busy": 0}
    ),
    "queue_depth": 0,
}
_TASK = {
    "task_id": "t-finished",
    "session_id": EXAMPLE_SESSION,
    "model": "mock-small",
    "priority": "interactive",
    "state": "succeeded",
    "pool_id": "default",
    "usage": {"tokens_in": 3, "tokens_out": 3, "cost": 0.0001},
    "timings": {"created_ms": 1795000000000},
}
_SESSION = {
    "session_id": EXAMPLE_SESSION,
    "created_ms": 1795000000000,
    "ttl_ms": 600000,
    "ttl_ms_remaining": 599000,
    "turns": 0,
    "max_turns": 1000,
    "kv_warmth": False,
    "budgets": {"tokens_remaining": 1000, "time_ms_remaining": 3600000, "cost_remaining": 10.0},
}
_ARTIFACT = {
    "id": DOCUMENT_ID,
    "digest": DOCUMENT_ID.removeprefix("sha256:"),
    "kind": "document",
    "size_bytes": len(DOCUMENT),
    "created_ms": 1795000000000,
    "tags": [],
}


@dataclass(frozen=True)
class Scenario:
    """One interaction: the client's operation, the provider state, and the answer."""

    op: Operation[Any]
    status: int
    state: str
    code: str | None = None  # the error code of a non-2xx answer
    params: dict[str, Any] = field(default_factory=dict)
    body: Any = None  # the answer's body (a matcher); None: no body / the error envelope
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    # A text body (SSE, metrics) is matched by this regex (Rust regex and Oniguruma alike).
    body_regex: str | None = None
    api_key: str | None = None
    path_from_state: str | None = None  # e.g. "/v1/sessions/${session_id}"
    body_from_state: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    started: bool = True  # a stream: the task reached an engine (a started frame)

    @property
    def description(self) -> str:
        what = f"{self.code}" if self.code else "success"
        return f"{self.op.operation_id} answered {self.status} ({what}) when {self.state}"


def stream_op(task_id: str) -> Operation[Any]:
    return Operation("streamTask", "GET", ops.stream_path(task_id), lambda r: r.text, (200,))


def envelope(code: str, retriable: bool) -> dict[str, Any]:
    return {
        "code": code,
        "message": match.str("a message for people"),
        "retriable": retriable,
        "correlation_id": match.str("c-1"),
    }


# A representative request of every operation, for the statuses any request can get.
SAMPLES: dict[str, Operation[Any]] = {
    "createTask": ops.create_task(model="mock-small", prompt="Tell me a story", max_tokens=3),
    "listTasks": ops.list_tasks(limit=5),
    "getTask": ops.get_task("t-finished"),
    "streamTask": stream_op("t-finished"),
    "cancelTask": ops.cancel_task("t-finished"),
    "createSession": ops.create_session(tokens=1000),
    "getSession": ops.get_session(EXAMPLE_SESSION),
    "deleteSession": ops.delete_session(EXAMPLE_SESSION),
    "getCapabilities": ops.get_capabilities(),
    "createArtifact": ops.create_artifact(kind="document", content=DOCUMENT),
    "listArtifacts": ops.list_artifacts(limit=5),
    "getArtifact": ops.get_artifact(DOCUMENT_ID),
    "listPools": ops.list_pools(),
    "getPoolHealth": ops.get_pool_health("default"),
    "drainPool": ops.drain_pool("default", deadline_ms=60000),
    "resumePool": ops.resume_pool("default"),
    "reloadPool": ops.reload_pool("spare", model="mock-spare-2"),
    "livez": ops.livez(),
    "readyz": ops.readyz(),
    "getMetrics": ops.get_metrics(),
}
PUBLIC = frozenset({"livez", "readyz"})
BODY_OPS = ("createTask", "createSession", "createArtifact", "drainPool", "reloadPool")


def _generic() -> list[Scenario]:
    out: list[Scenario] = []
    for op_id, op in SAMPLES.items():
        odd = replace(op, params={**op.params, "unexpected": "1"})
        out.append(Scenario(odd, 400, RUNNING, "INVALID_PARAMS"))
        if op_id in PUBLIC:
            continue
        out.append(Scenario(op, 401, NO_KEY, "MISSING_TOKEN"))
        scope_key = _SCOPE_KEY.get(op_id, METRICS_ONLY_KEY)
        out.append(Scenario(op, 403, WRONG_SCOPE, "FORBIDDEN_SCOPE", api_key=scope_key))
        out.append(
            Scenario(
                op,
                429,
                RATE_LIMITED,
                "RATE_LIMITED",
                params={"operation_id": op_id},
                headers=RETRY_HEADERS,
                api_key=PACT_KEY,
            )
        )
    for op_id in BODY_OPS:
        op = SAMPLES[op_id]
        big = replace(op, json={**(op.json or {}), "pad": TOO_LARGE})
        out.append(Scenario(big, 413, RUNNING, "PAYLOAD_TOO_LARGE"))
        text = replace(op, json=None, content=b"plain text", headers={"Content-Type": "text/plain"})
        out.append(Scenario(text, 415, RUNNING, "UNSUPPORTED_MEDIA_TYPE"))
    return out


def _specific() -> list[Scenario]:
    task_json = {
        "task_id": "t-new",
        "session_id": EXAMPLE_SESSION,
        "state": "queued",
        "pool_id": "default",
        "queue_position": 0,
        "predicted_start_ms": 1795000000000,
        "backoff_ms": 0,
        "streams": {"sse": "/v1/tasks/t-new/stream"},
    }
    create = SAMPLES["createTask"]
    return [
        # data plane
        Scenario(create, 202, RUNNING, body=match.like(task_json), headers=BUDGET_HEADERS),
        Scenario(
            ops.create_task(model="mock-small", prompt="Hi", max_tokens=3, session_id="s-nope"),
            404,
            RUNNING,
            "SESSION_NOT_FOUND",
        ),
        Scenario(
            ops.create_task(
                model="mock-small", prompt="Another", max_tokens=3, task_id="t-finished"
            ),
            409,
            FINISHED,
            "TASK_EXISTS",
        ),
        Scenario(
            ops.create_task(model="mock-slow", prompt="Hi", max_tokens=3),
            429,
            FULL,
            "ADMISSION_REJECT",
            params={"pool_id": "slow"},
            headers=RETRY_HEADERS | {"X-Backoff-Ms": match.regex("1000", regex=INT)},
        ),
        Scenario(
            ops.create_task(
                model="mock-small", prompt="Hi", max_tokens=3, session_id=EXAMPLE_SESSION
            ),
            429,
            NO_TOKENS,
            "BUDGET_EXHAUSTED",
            params={"tokens": 0},
            headers=RETRY_HEADERS,
            body_from_state={"session_id": "${session_id}"},
        ),
        Scenario(create, 503, LOCKED, "STORAGE_UNAVAILABLE", headers=RETRY_HEADERS),
        Scenario(create, 503, DRAINING, "POOL_UNAVAILABLE", headers=RETRY_HEADERS),
        Scenario(
            SAMPLES["listTasks"],
            200,
            FINISHED,
            body={"items": match.each_like(_TASK), "next_cursor": None},
        ),
        Scenario(SAMPLES["getTask"], 200, FINISHED, body=match.like(_TASK)),
        Scenario(ops.get_task("t-nope"), 404, RUNNING, "TASK_NOT_FOUND"),
        Scenario(
            stream_op("t-finished"),
            200,
            FINISHED,
            body=FINISHED_EXAMPLE,
            body_regex=FINISHED_SSE,
            headers=BUDGET_HEADERS,
            content_type="text/event-stream",
            stream=True,
        ),
        Scenario(
            stream_op("t-failed"),
            200,
            FAILED,
            body=FAILED_EXAMPLE,
            body_regex=FAILED_SSE,
            headers=BUDGET_HEADERS,
            content_type="text/event-stream",
            stream=True,
        ),
        Scenario(
            stream_op("t-waited"),
            200,
            WAITED,
            body=WAITED_EXAMPLE,
            body_regex=WAITED_SSE,
            headers=BUDGET_HEADERS,
            content_type="text/event-stream",
            stream=True,
            started=False,
        ),
        Scenario(stream_op("t-nope"), 404, RUNNING, "TASK_NOT_FOUND"),
        Scenario(SAMPLES["cancelTask"], 204, FINISHED),
        Scenario(ops.cancel_task("t-nope"), 404, RUNNING, "TASK_NOT_FOUND"),
        Scenario(SAMPLES["createSession"], 201, RUNNING, body=match.like(_SESSION)),
        Scenario(
            ops.create_session(tokens=1000),
            503,
            LOCKED,
            "STORAGE_UNAVAILABLE",
            headers=RETRY_HEADERS,
        ),
        Scenario(
            SAMPLES["getSession"],
            200,
            SESSION,
            body=match.like(_SESSION),
            path_from_state="/v1/sessions/${session_id}",
        ),
        Scenario(ops.get_session("s-nope"), 404, RUNNING, "SESSION_NOT_FOUND"),
        Scenario(
            SAMPLES["deleteSession"], 204, SESSION, path_from_state="/v1/sessions/${session_id}"
        ),
        Scenario(ops.delete_session("s-nope"), 404, RUNNING, "SESSION_NOT_FOUND"),
        Scenario(
            SAMPLES["deleteSession"],
            503,
            LOCKED,
            "STORAGE_UNAVAILABLE",
            params={"session": True},
            headers=RETRY_HEADERS,
            path_from_state="/v1/sessions/${session_id}",
        ),
        # control plane
        Scenario(
            SAMPLES["getCapabilities"],
            200,
            RUNNING,
            body=match.like(
                {"api_version": "0.1.0", "pools": match.each_like({"pool_id": "default"})}
            ),
        ),
        Scenario(
            ops.create_artifact(kind="document", content="A new document."),
            201,
            RUNNING,
            body=match.like(_ARTIFACT),
        ),
        Scenario(
            SAMPLES["createArtifact"],
            200,
            ARTIFACT,
            params={"content": DOCUMENT},
            body=match.like(_ARTIFACT),
        ),
        Scenario(
            ops.create_artifact(kind="document", content="Stored while locked."),
            503,
            LOCKED,
            "STORAGE_UNAVAILABLE",
            headers=RETRY_HEADERS,
        ),
        Scenario(
            SAMPLES["listArtifacts"],
            200,
            ARTIFACT,
            params={"content": DOCUMENT},
            body={"items": match.each_like(_ARTIFACT), "next_cursor": None},
        ),
        Scenario(
            SAMPLES["getArtifact"],
            200,
            ARTIFACT,
            params={"content": DOCUMENT},
            body=match.like(_ARTIFACT | {"content": DOCUMENT}),
        ),
        Scenario(ops.get_artifact(MISSING_ID), 404, RUNNING, "ARTIFACT_NOT_FOUND"),
        Scenario(
            ops.get_artifact(CORRUPT_ID),
            500,
            CORRUPT,
            "ARTIFACT_CORRUPT",
            params={"content": CORRUPT_DOC},
        ),
        Scenario(SAMPLES["listPools"], 200, RUNNING, body={"items": match.each_like(_POOL)}),
        Scenario(SAMPLES["getPoolHealth"], 200, RUNNING, body=match.like(_POOL)),
        Scenario(ops.get_pool_health("nope"), 404, RUNNING, "POOL_NOT_FOUND"),
        Scenario(SAMPLES["drainPool"], 202, ADMITTING, body=match.like(_POOL)),
        Scenario(ops.drain_pool("nope", deadline_ms=1000), 404, RUNNING, "POOL_NOT_FOUND"),
        Scenario(SAMPLES["drainPool"], 409, DRAINING, "ALREADY_DRAINING"),
        Scenario(SAMPLES["resumePool"], 202, DRAINING, body=match.like(_POOL)),
        Scenario(ops.resume_pool("nope"), 404, RUNNING, "POOL_NOT_FOUND"),
        Scenario(SAMPLES["resumePool"], 409, ADMITTING, "NOT_DRAINING"),
        Scenario(SAMPLES["reloadPool"], 202, SPARE_IDLE, body=match.like(_POOL)),
        Scenario(ops.reload_pool("nope", model="mock-small"), 404, RUNNING, "POOL_NOT_FOUND"),
        Scenario(SAMPLES["reloadPool"], 409, SPARE_RELOADING, "RELOAD_IN_PROGRESS"),
        Scenario(SAMPLES["livez"], 200, RUNNING, body={"status": "ok"}),
        Scenario(SAMPLES["readyz"], 200, RUNNING, body={"status": "ok"}),
        Scenario(SAMPLES["readyz"], 503, ALL_DOWN, "NOT_READY", headers=RETRY_HEADERS),
        Scenario(
            SAMPLES["getMetrics"],
            200,
            RUNNING,
            body="# HELP llorch_queue_depth x\n",
            body_regex=r"\A# HELP [^\n]*\n([^\n]*\n)*\z",
            content_type="text/plain",
        ),
    ]


SCENARIOS: list[Scenario] = _specific() + _generic()

# Declared (operation, status) pairs the pact does not hold, and why. `xtask.py status-coverage`
# accepts them only when a test of the suite received them (recorded by the status recorder).
NOT_IN_PACT: dict[tuple[str, int], str] = {}

# The OpenAI facade's consumer is the official openai SDK, not the CLI: its pairs are covered by
# tests/api/test_openai.py, which drives a live server with that SDK.
_T = "tests/api/test_openai.py::"
_FACADE_TESTS = {
    200: "test_a_stream_is_token_by_token_then_usage_then_done",
    400: "test_what_the_facade_does_not_serve_is_a_400_naming_it",
    401: "test_keys_and_scopes_are_those_of_the_task_api",
    403: "test_keys_and_scopes_are_those_of_the_task_api",
    404: "test_unknown_model_and_session_are_404",
    409: "test_a_task_id_reused_with_another_body_is_409_not_retried",
    413: "test_too_large_and_non_json_bodies_are_openai_errors",
    415: "test_too_large_and_non_json_bodies_are_openai_errors",
    429: "test_a_spent_budget_is_429_and_not_retried, test_a_full_queue_is_429_with_retry_advice",
    502: "test_a_drained_pool_is_503_and_an_engine_failure_502",
    503: "test_a_drained_pool_is_503_and_an_engine_failure_502",
}
_MODEL_TESTS = {
    200: "test_models_are_listed_and_retrieved",
    400: "test_bad_model_requests_are_400",
    401: "test_keys_and_scopes_are_those_of_the_task_api",
    403: "test_keys_and_scopes_are_those_of_the_task_api",
    404: "test_models_are_listed_and_retrieved",
    429: "test_the_sdk_waits_as_retry_after_advises",
}
for _op in ("createChatCompletion", "createCompletion"):
    NOT_IN_PACT |= {(_op, status): _T + test for status, test in _FACADE_TESTS.items()}
NOT_IN_PACT |= {
    (op, status): _T + test
    for op in ("listModels", "getModel")
    for status, test in _MODEL_TESTS.items()
    if (op, status) != ("listModels", 404)
}

# What only a real storage fault produces, which no provider state of the CLI's pact sets up:
# a database disk that refuses writes (500 on the writes the pact shows refused 503 while the
# write lock is held elsewhere), and reads while PostgreSQL is unreachable (503; on SQLite a
# held write lock leaves reads alone).
_DISK_FULL = "tests/e2e/test_disk_full.py::test_a_full_database_disk_is_a_500_that_names_no_file"
_OUTAGE = (
    "tests/e2e/test_database_outage.py::"
    "test_postgresql_stopped_and_restarted_under_a_running_server"
)
NOT_IN_PACT |= {
    (op, 500): _DISK_FULL
    for op in (
        "createTask",
        "createSession",
        "deleteSession",
        "createArtifact",
        "createChatCompletion",
        "createCompletion",
    )
}
NOT_IN_PACT |= {
    (op, 503): _OUTAGE
    for op in ("getTask", "listTasks", "getSession", "listArtifacts", "getArtifact")
}
