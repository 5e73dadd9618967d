"""What the scheduler, sessions and artifacts need from storage: one typed interface.

:class:`llorch.persistence.db.Database` (SQLite, the embedded default) and
:class:`llorch.persistence.postgres.PostgresStorage` (PostgreSQL, ``database.url``) implement it;
:func:`open_storage` opens the one the settings name.
Every write is one transaction; a write storage refuses raises :class:`llorch.errors.StorageError`
and leaves :attr:`Storage.write_failing` true until a write succeeds.

A write never waits for a lock held elsewhere inside the call (the event loop would wait with
it: every request and stream, ``/livez`` included): it raises :class:`llorch.errors.StorageBusy`
at once, and :func:`when_free` tries it again between other work (ORCH-STATE-0009).

The methods are synchronous; the scheduler calls them through :meth:`Storage.run`, which runs a
call where the store wants it: inline on the event loop for SQLite (a local file, one
connection that is not thread-safe, microseconds a call), in a worker thread for PostgreSQL (a
network round trip: the loop serves other requests and streams meanwhile, ORCH-STATE-0060). A
call passed to :meth:`Storage.run` touches nothing but storage: the scheduler's state is read
before it and changed after it, on the loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from llorch.config import Settings
from llorch.errors import StorageBusy
from llorch.persistence.cluster import Cluster
from llorch.persistence.db import Database
from llorch.persistence.rows import ArtifactInsert, Reservation, SessionRow, TaskRow

T = TypeVar("T")
P = ParamSpec("P")


class Storage(Protocol):
    # Whether the most recent write was refused (readiness reports it).
    write_failing: bool
    # How long a write may wait, in all, for a write lock held elsewhere (see when_free).
    busy_budget_s: float
    # Whether session reservations live in storage (PostgreSQL: several instances share
    # them, ORCH-STATE-0050) rather than in the process's memory (SQLite).
    holds_reservations: bool
    # What several instances share beyond the rows (None on SQLite: one process).
    cluster: Cluster | None

    # Whether :meth:`run` leaves the event loop (PostgreSQL) or calls inline (SQLite): an
    # awaited call may then let other work run on the loop before it returns.
    offloads: bool

    async def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)``, one of this store's methods (or several in a function
        that touches nothing else), where the store runs it: inline, or in a worker thread
        with the event loop free meanwhile. Cancelling the caller does not stop a call under
        way in a thread."""
        ...

    def probe_write(self) -> bool:
        """While writes fail, one write that changes nothing; whether storage takes writes."""
        ...

    def close(self) -> None: ...

    async def durable(self) -> None:
        """Return once every commit made before the call is durable (ORCH-STATE-0020). A 2xx
        or a task's terminal frame that answers for a commit waits for this first."""
        ...

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop once every commit made so far is durable, before any
        caller of :meth:`durable` covered by the same fsync resumes (at once when nothing waits
        for an fsync)."""
        ...

    def schema_version(self) -> int:
        """The number of the last migration applied."""
        ...

    # -- sessions ---------------------------------------------------------------------------

    def insert_session(self, row: SessionRow) -> None: ...

    def get_session(self, session_id: str) -> SessionRow | None: ...

    def delete_session(self, session_id: str) -> bool: ...

    # -- tasks ------------------------------------------------------------------------------

    def admit_task(
        self,
        task: TaskRow,
        session: SessionRow,
        *,
        new_session: bool,
        reservation: Reservation | None = None,
    ) -> int:
        """The accepted task and its session's turn (a new session inserted), together; a
        store that holds reservations also takes ``reservation`` there, under the session
        row's lock, and raises BudgetExhausted when the session cannot afford it."""
        ...

    def get_task(self, task_id: str) -> TaskRow | None: ...

    def place_task(
        self, task_id: str, session_id: str, *, pool_id: str, replica_id: str, **task_values: Any
    ) -> None:
        """The task's replica (and other changed columns) and its session's placement."""
        ...

    def record_progress(self, progress: Sequence[tuple[str, int]], now_ms: int) -> None:
        """Running tasks' tokens_out so far, checkpointed at ``now_ms``."""
        ...

    def finish_task(
        self,
        task_id: str,
        task_values: dict[str, Any],
        session_id: str,
        session_values: dict[str, Any],
        trace: ArtifactInsert | None = None,
        used: Reservation | None = None,
    ) -> Reservation | None:
        """The task's final row, its session's charge and its trace's row, together. A store
        that holds reservations releases the task's own there and charges ``used`` (at most
        once per task), returning the usage the session could not pay. A store that several
        instances share raises EndedElsewhere (after its commit) when the task had ended
        already: its stored row is the end to tell (ORCH-STATE-0038)."""
        ...

    def update_task(self, task_id: str, **values: Any) -> None: ...

    def list_tasks(
        self,
        *,
        session_id: str | None,
        state: str | None,
        limit: int,
        before_seq: int | None,
        owner: str | None = None,
    ) -> list[TaskRow]: ...

    def tasks_in_states(self, states: Sequence[str]) -> list[TaskRow]: ...

    # -- artifacts --------------------------------------------------------------------------

    def insert_artifact(self, artifact: ArtifactInsert) -> bool:
        """True when this is its owner's first store of the content."""
        ...

    def get_artifact(
        self, artifact_id: str, viewer: str | None = None
    ) -> dict[str, Any] | None: ...

    def artifact_owned_by(self, artifact_id: str, owner: str) -> bool: ...

    def list_artifacts(
        self,
        *,
        kind: str | None,
        tag: str | None,
        task_id: str | None,
        limit: int,
        before_seq: int | None,
        owner: str | None = None,
        viewer: str | None = None,
    ) -> list[dict[str, Any]]: ...


def open_storage(settings: Settings) -> Storage:
    """The store the settings name, opened, migrated and verified: PostgreSQL when
    ``database.url`` is set, else SQLite under ``server.data_dir``."""
    server = settings.server
    if settings.database.url is None:
        return Database.open(
            settings.database_path,
            profile=server.profile,
            busy_timeout_ms=server.storage_busy_timeout_ms,
        )
    # Imported here: a server on SQLite never loads the PostgreSQL driver.
    from llorch.persistence.postgres import PostgresStorage

    return PostgresStorage.open(
        settings.database.url,
        profile=server.profile,
        busy_timeout_ms=server.storage_busy_timeout_ms,
        timeout_ms=settings.database.timeout_ms,
        retry_ms=settings.database.retry_ms,
        instance=(settings.instance_id, settings.database.instance_ttl_ms),
    )


async def when_free(storage: Storage, write: Callable[[], T]) -> T:
    """``write()`` through :meth:`Storage.run`; while it finds the write lock held elsewhere,
    tried again with backoff (2 ms doubling to 100 ms) for up to ``storage.busy_budget_s``, the
    event loop free meanwhile; it returns once the write is durable. Only a write without side
    effects before its transaction commits, that touches nothing but storage, may be passed."""
    return await retry_busy(storage, lambda: storage.run(write))


async def retry_busy(storage: Storage, attempt: Callable[[], Awaitable[T]]) -> T:
    """:func:`when_free` for an ``attempt`` that awaits its own storage calls (an admission:
    checks on the loop, its transaction through :meth:`Storage.run`)."""
    try:
        done = await attempt()  # the common case, without the retry machinery's cost
    except StorageBusy:
        if storage.busy_budget_s <= 0:
            raise
    else:
        await storage.durable()
        return done
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(StorageBusy),
        wait=wait_exponential(multiplier=0.002, max=0.1),
        stop=stop_after_delay(storage.busy_budget_s),
        reraise=True,
    )
    async for tried in retrying:
        with tried:
            done = await attempt()
    await storage.durable()  # the loop ends with a commit: it re-raises its last failure
    return done
