"""The rows llorch keeps, and the SQL both stores build from them (SQLite's ``?`` or
PostgreSQL's ``%s`` as the parameter mark): one definition of each column list and query shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    created_ms: int
    last_used_ms: int
    ttl_ms: int
    turns: int
    max_turns: int
    tokens_remaining: int
    time_ms_remaining: int
    cost_remaining: float
    last_pool_id: str | None = None
    last_replica_id: str | None = None
    owner: str | None = None


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    session_id: str
    pool_id: str
    model: str
    priority: str
    state: str
    request_json: str
    request_digest: str
    correlation_id: str
    created_ms: int
    seq: int = 0
    started_ms: int | None = None
    ended_ms: int | None = None
    ttft_ms: int | None = None
    decode_time_ms: int | None = None
    replica_id: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_retriable: bool | None = None
    trace_artifact_id: str | None = None
    terminal_event_id: int | None = None
    owner: str | None = None
    # When tokens_out of a running task was last checkpointed (Database.record_progress).
    progress_ms: int | None = None


class EndedElsewhere(Exception):
    """A task's end was recorded, but the task had ended already (another instance took it
    over and ended it, ORCH-STATE-0038): ``row`` is its stored final row, the one to tell."""

    def __init__(self, row: TaskRow) -> None:
        super().__init__(f"task {row.task_id} ended already ({row.state})")
        self.row = row


@dataclass(frozen=True)
class Reservation:
    """Budget amounts: what a task may spend at most (held until it ends), or what it used."""

    tokens: int
    time_ms: int
    cost: float


@dataclass(frozen=True, slots=True)
class ArtifactInsert:
    """An artifact's row, as :meth:`Storage.insert_artifact` stores it."""

    artifact_id: str
    digest: str
    kind: str
    size_bytes: int
    created_ms: int
    tags: str  # JSON
    parent: str | None
    task_id: str | None
    metadata: str  # JSON
    owner: str | None = None


TASK_COLUMNS = [f.name for f in dataclasses.fields(TaskRow)]
SESSION_COLUMNS = [f.name for f in dataclasses.fields(SessionRow)]
# Every column but the sequence number, which the database assigns.
ADMIT_COLUMNS = [c for c in TASK_COLUMNS if c != "seq"]


def own_views(mark: str) -> str:
    """An owner's views, each with its content's columns; one parameter: the owner."""
    return (
        "SELECT v.seq, a.artifact_id, a.digest, v.kind, a.size_bytes, v.created_ms, v.tags, "
        "v.parent, v.task_id, v.metadata FROM artifact_views v "
        f"JOIN artifacts a ON a.artifact_id = v.artifact_id WHERE v.owner = {mark}"
    )


def shown(with_viewer: bool, mark: str, text_mark: str | None = None) -> str:
    """Every artifact, in its viewer's own view where there is one and else as its first store
    wrote it; one parameter: the viewer (NULL matches no view). ``text_mark``: the mark typed as
    text, where the database must know the type of a parameter only compared with NULL."""
    if not with_viewer:
        return (
            "SELECT seq, artifact_id, digest, kind, size_bytes, created_ms, tags, parent, "
            f"task_id, metadata FROM artifacts WHERE {text_mark or mark} IS NULL"
        )
    picked = ", ".join(
        f"CASE WHEN v.seq IS NULL THEN a.{c} ELSE v.{c} END AS {c}"
        for c in ("kind", "created_ms", "tags", "parent", "task_id", "metadata")
    )
    return (
        f"SELECT a.seq, a.artifact_id, a.digest, a.size_bytes, {picked} FROM artifacts a "
        f"LEFT JOIN artifact_views v ON v.artifact_id = a.artifact_id AND v.owner = {mark}"
    )


def where(*filters: tuple[str, object]) -> tuple[str, list[object]]:
    """A WHERE clause of the filters whose value is given, and their parameters."""
    given = [(clause, value) for clause, value in filters if value is not None]
    if not given:
        return "", []
    return "WHERE " + " AND ".join(c for c, _ in given), [v for _, v in given]


def task_list(
    mark: str,
    session_id: str | None,
    state: str | None,
    before_seq: int | None,
    owner: str | None,
    limit: int,
) -> tuple[str, list[object]]:
    """A page of tasks, newest first, filtered by whichever of the filters are given: the query
    (its parameters marked ``mark``, each store's placeholder) and its parameters."""
    clause, params = where(
        (f"session_id = {mark}", session_id),
        (f"state = {mark}", state),
        (f"seq < {mark}", before_seq),
        (f"owner = {mark}", owner),
    )
    query = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks {clause} ORDER BY seq DESC LIMIT {mark}"
    return query, [*params, limit]


def task_row(found: Sequence[Any]) -> TaskRow:
    """A task row from the values of TASK_COLUMNS, in order."""
    values = dict(zip(TASK_COLUMNS, found, strict=True))
    if values["error_retriable"] is not None:
        values["error_retriable"] = bool(values["error_retriable"])
    return TaskRow(**values)


def numbered_scripts(folder: str) -> list[tuple[int, str]]:
    """The numbered migration scripts of ``llorch.persistence/<folder>``, in order."""
    found = []
    for entry in (resources.files("llorch.persistence") / folder).iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)
