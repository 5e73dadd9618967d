"""The domain exception tree. No HTTP here: ``llorch.api.problems`` maps codes to statuses.

::

    LlorchError                      code, message, retriable, retry_after_ms, labels
    ├── InvalidParams                INVALID_PARAMS
    ├── AuthError
    │   ├── MissingToken             MISSING_TOKEN
    │   ├── BadToken                 BAD_TOKEN
    │   └── ForbiddenScope           FORBIDDEN_SCOPE
    ├── RateLimited                  RATE_LIMITED
    ├── DeadlineUnmet                DEADLINE_UNMET
    ├── NotFoundError
    │   ├── TaskNotFound             TASK_NOT_FOUND
    │   ├── SessionNotFound          SESSION_NOT_FOUND
    │   ├── PoolNotFound             POOL_NOT_FOUND
    │   └── ArtifactNotFound         ARTIFACT_NOT_FOUND
    ├── TaskExists                   TASK_EXISTS
    ├── AlreadyDraining              ALREADY_DRAINING
    ├── NotDraining                  NOT_DRAINING
    ├── ReloadInProgress             RELOAD_IN_PROGRESS
    ├── QueueFull
    │   ├── AdmissionReject          ADMISSION_REJECT
    │   └── QueueFullDropLru         QUEUE_FULL_DROP_LRU
    ├── BudgetExhausted              BUDGET_EXHAUSTED
    ├── Unavailable
    │   ├── PoolUnready              POOL_UNREADY
    │   ├── QueueTimeout             QUEUE_TIMEOUT: waited in the queue past its limit
    │   ├── PoolUnavailable          POOL_UNAVAILABLE
    │   └── ShuttingDown             SHUTTING_DOWN
    ├── PayloadTooLarge              PAYLOAD_TOO_LARGE
    ├── ArtifactCorrupt              ARTIFACT_CORRUPT
    ├── StorageError                 INTERNAL
    │   ├── StorageUnavailable       STORAGE_UNAVAILABLE: the database cannot be reached, or
    │   │   │                        did not answer within its budget (a retry can cure it)
    │   │   └── StorageBusy          STORAGE_UNAVAILABLE: the write lock is held elsewhere
    │   │                            (retried first, for server.storage_busy_timeout_ms)
    │   └── StorageCorrupt           INTERNAL, not retriable: an empty or corrupt database file
    └── EngineError                  ENGINE_ERROR (raised by engines, seen on streams)
        ├── EngineUnavailable        ENGINE_ERROR: refused, unreachable, connect timeout
        ├── EngineProtocolError      ENGINE_ERROR: a malformed or unfinished stream
        ├── EngineStatusError        ENGINE_ERROR: the engine answered 5xx or 429
        │   └── EngineRejected       ENGINE_ERROR, not retriable: the engine answered 4xx
        ├── WorkerReset              WORKER_RESET: the connection dropped mid-stream
        └── DecodeTimeout            DECODE_TIMEOUT
            └── EngineTimeout        DECODE_TIMEOUT: no first token, or over the total time
"""

from __future__ import annotations

from typing import Any, ClassVar


class LlorchError(Exception):
    """The base, raised as such only for a fault of the server: INTERNAL, retriable."""

    code: ClassVar[str] = "INTERNAL"
    retriable: ClassVar[bool] = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_ms: int | None = None,
        policy_label: str | None = None,
        pool_id: str | None = None,
        engine: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.policy_label = policy_label
        self.pool_id = pool_id
        self.engine = engine


class InvalidParams(LlorchError):
    code = "INVALID_PARAMS"
    retriable = False


class DeadlineUnmet(LlorchError):
    code = "DEADLINE_UNMET"
    retriable = False


class NotFoundError(LlorchError):
    code = "NOT_FOUND"
    retriable = False


class TaskNotFound(NotFoundError):
    code = "TASK_NOT_FOUND"


class SessionNotFound(NotFoundError):
    code = "SESSION_NOT_FOUND"


class PoolNotFound(NotFoundError):
    code = "POOL_NOT_FOUND"


class TaskExists(LlorchError):
    code = "TASK_EXISTS"
    retriable = False


class AlreadyDraining(LlorchError):
    code = "ALREADY_DRAINING"
    retriable = False


class NotDraining(LlorchError):
    code = "NOT_DRAINING"
    retriable = False


class ReloadInProgress(LlorchError):
    code = "RELOAD_IN_PROGRESS"
    retriable = True


class QueueFull(LlorchError):
    retriable = True


class AdmissionReject(QueueFull):
    code = "ADMISSION_REJECT"


class QueueFullDropLru(QueueFull):
    code = "QUEUE_FULL_DROP_LRU"


class BudgetExhausted(LlorchError):
    code = "BUDGET_EXHAUSTED"
    retriable = False


class Unavailable(LlorchError):
    retriable = True


class PoolUnready(Unavailable):
    code = "POOL_UNREADY"


class QueueTimeout(Unavailable):
    code = "QUEUE_TIMEOUT"


class PoolUnavailable(Unavailable):
    code = "POOL_UNAVAILABLE"


class ShuttingDown(Unavailable):
    code = "SHUTTING_DOWN"


class StorageError(LlorchError):
    """The database failed (locked past its busy timeout, disk error): a server fault."""

    code = "INTERNAL"
    retriable = True


class StorageUnavailable(StorageError):
    """The database did not take the call for now: unreachable (PostgreSQL stopped, the network
    down), or it did not answer within its budget. Nothing was changed by the refused call, and
    the same call later can succeed: ``retry_after_ms`` says when it is worth trying."""

    code = "STORAGE_UNAVAILABLE"
    retriable = True

    def __init__(self, message: str, *, retry_after_ms: int | None = 1000, **kwargs: Any) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms, **kwargs)


class StorageBusy(StorageUnavailable):
    """Another connection holds the database's write lock: the write did not wait for it (the
    event loop must not), and may be tried again (:func:`llorch.persistence.when_free`); past
    that budget it is refused as unavailable."""


class StorageCorrupt(StorageError):
    """The database file is empty (zero bytes) or fails SQLite's ``quick_check``: the server
    refuses to start on it rather than start empty or serve from broken pages."""

    retriable = False


class EngineError(LlorchError):
    code = "ENGINE_ERROR"
    retriable = True


class WorkerReset(EngineError):
    code = "WORKER_RESET"


class DecodeTimeout(EngineError):
    code = "DECODE_TIMEOUT"


# The engine adapters' seam (llorch.engines.openai_http) raises these; they keep the codes above
# so the stream and envelope vocabulary stays the same, and the class says what went wrong.


class EngineUnavailable(EngineError):
    """The engine could not be reached: connection refused, DNS, connect timeout."""


class EngineProtocolError(EngineError):
    """The engine answered something that is not the streaming protocol, or stopped mid-way."""


class EngineStatusError(EngineError):
    """The engine answered an HTTP error status (5xx, 429): worth retrying elsewhere."""

    def __init__(self, message: str, *, status: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.status = status

    @property
    def overloaded(self) -> bool:
        """The engine said it is busy (429) or not serving yet (503): not a fault of its own."""
        return self.status in (429, 503)


class EngineRejected(EngineStatusError):
    """The engine refused the request itself (4xx other than 429): retrying cannot help."""

    retriable = False


class EngineTimeout(DecodeTimeout):
    """No first token within the time-to-first-token limit, or the total time ran out."""


class PayloadTooLarge(LlorchError):
    code = "PAYLOAD_TOO_LARGE"
    retriable = False


class ArtifactNotFound(NotFoundError):
    code = "ARTIFACT_NOT_FOUND"


class ArtifactCorrupt(LlorchError):
    """A stored body is missing or no longer matches its digest; it is never served."""

    code = "ARTIFACT_CORRUPT"
    retriable = False


class AuthError(LlorchError):
    """The request's credentials do not allow it; the message never repeats the credential."""

    retriable = False


class MissingToken(AuthError):
    code = "MISSING_TOKEN"


class BadToken(AuthError):
    code = "BAD_TOKEN"


class ForbiddenScope(AuthError):
    code = "FORBIDDEN_SCOPE"


class RateLimited(LlorchError):
    """The key spent its request rate; ``retry_after_ms`` says when its bucket has a token."""

    code = "RATE_LIMITED"
    retriable = True
