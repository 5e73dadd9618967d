"""The content-addressed artifact store.

An artifact's id is ``sha256:`` and the hex digest of its UTF-8 bytes. Its body is a file named by
that digest under ``root`` (``root/ab/abcdef…``), written atomically; its metadata is a row in
SQLite, written only once the body is durably in place. Reading re-hashes the body, so a body
changed or lost on disk is reported as :class:`ArtifactCorrupt` and never served. On PostgreSQL
(a cluster) the body is a row of ``artifact_bodies`` instead, readable through every instance::

    store = ArtifactStore(db, settings.artifacts_dir, max_bytes=settings.artifacts.max_bytes,
                          clock=SystemClock())
    artifact, created = store.put(kind="prompt", content="You are a helpful assistant.")
    same, content = store.get(artifact.id)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from llorch.clock import Clock
from llorch.errors import (
    ArtifactCorrupt,
    ArtifactNotFound,
    InvalidParams,
    PayloadTooLarge,
    StorageError,
)
from llorch.metrics import Metrics
from llorch.persistence import ArtifactInsert, Storage

KINDS = ("prompt", "trace", "transcript", "document", "other")

_ID = re.compile(r"sha256:[0-9a-f]{64}")
_CURSOR = re.compile(r"[0-9]{1,19}")
# SQLite integers are signed 64-bit; a larger cursor (the contract allows 19 digits) means
# "from the newest", like any cursor above every stored seq.
_MAX_SEQ = 2**63 - 1

log = logging.getLogger("llorch.artifacts")


@dataclass(frozen=True)
class Artifact:
    id: str
    digest: str
    kind: str
    size_bytes: int
    created_ms: int
    tags: tuple[str, ...]
    parent: str | None
    task_id: str | None
    # Read-only, and left out of the hash: a mapping has none.
    metadata: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True)
class Prepared:
    """An artifact checked and hashed by :meth:`ArtifactStore.prepare`, not yet stored."""

    digest: str
    data: bytes
    kind: str
    tags: tuple[str, ...]
    parent: str | None
    task_id: str | None
    metadata: dict[str, str]
    owner: str | None


class ArtifactStore:
    def __init__(
        self,
        db: Storage,
        root: Path,
        *,
        max_bytes: int,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self._root = root
        # On a cluster the bodies live in the database, readable through every instance
        # (ORCH-STATE-0054); on SQLite they are files under ``root``.
        self._shared = db.cluster
        self._max_bytes = max_bytes
        self._clock = clock
        self._metrics = metrics
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the artifact directory {root}: {exc}") from exc

    def put(
        self,
        *,
        kind: str,
        content: str,
        tags: Sequence[str] = (),
        parent: str | None = None,
        metadata: Mapping[str, str] | None = None,
        task_id: str | None = None,
        owner: str | None = None,
        visible_to: str | None = None,
    ) -> tuple[Artifact, bool]:
        """(artifact, created), the artifact as ``owner`` stored it.

        Content is shared by digest, but each ``owner`` (an API key's name) has its own view of it:
        its first store of the content is created (with its own kind, tags, parent, task and
        metadata) even when another owner stored the same bytes; storing it again is not, and
        answers the view it stored first. Without an owner (authentication off), identical
        content already stored is (the existing artifact, False). The body is rewritten only if
        it went missing or was corrupted on disk; a ``parent`` must be visible to ``visible_to``
        (None: to everyone).
        """
        prepared = self.prepare(
            kind=kind,
            content=content,
            tags=tags,
            parent=parent,
            metadata=metadata,
            task_id=task_id,
            owner=owner,
            visible_to=visible_to,
        )
        self.write(prepared)
        return self.commit(prepared)

    def prepare(
        self,
        *,
        kind: str,
        content: str,
        tags: Sequence[str] = (),
        parent: str | None = None,
        metadata: Mapping[str, str] | None = None,
        task_id: str | None = None,
        owner: str | None = None,
        visible_to: str | None = None,
    ) -> Prepared:
        """Check an artifact and compute its id; nothing is stored yet (see :meth:`put`)."""
        if kind not in KINDS:
            raise InvalidParams(f"unknown artifact kind {kind!r}; expected one of {KINDS}")
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidParams(f"artifact content is not valid Unicode: {exc.reason}") from exc
        if len(data) > self._max_bytes:
            raise PayloadTooLarge(
                f"artifact is {len(data)} bytes; the limit is {self._max_bytes} bytes"
            )
        if isinstance(tags, str):
            raise InvalidParams("tags must be a list of strings, not one string")
        meta = dict(metadata or {})
        for text in (*tags, *meta, *meta.values(), *([] if task_id is None else [task_id])):
            _check_text(text)
        if any("\x00" in t for t in tags):
            # A tag filter could never find it: neither store's JSON functions give it back whole.
            raise InvalidParams("an artifact tag must not hold a NUL character")
        if parent is not None and (
            not _ID.fullmatch(parent)
            or self._db.get_artifact(parent) is None
            or not self._visible(parent, visible_to)
        ):
            raise InvalidParams(f"parent {parent!r} is not a stored artifact")

        digest = hashlib.sha256(data).hexdigest()
        return Prepared(
            digest=digest,
            data=data,
            kind=kind,
            tags=tuple(tags),
            parent=parent,
            task_id=task_id,
            metadata=meta,
            owner=owner,
        )

    def write(self, prepared: Prepared) -> None:
        """Put the body on disk durably. File system work only: safe in a worker thread."""
        self._write_body(prepared.digest, prepared.data)

    def commit(self, prepared: Prepared) -> tuple[Artifact, bool]:
        """Record a written body (on the event loop's thread, like every database call)."""
        row = self.row(prepared)
        inserted = self._db.insert_artifact(row)
        return self._get_row(row.artifact_id, prepared.owner), inserted

    def row(self, prepared: Prepared) -> ArtifactInsert:
        """The row that records a written body, for a caller that stores it in a transaction
        of its own (:meth:`Storage.finish_task` stores a task's trace with the task's end)."""
        return ArtifactInsert(
            artifact_id=f"sha256:{prepared.digest}",
            digest=prepared.digest,
            kind=prepared.kind,
            size_bytes=len(prepared.data),
            created_ms=self._clock.now_ms(),
            tags=json.dumps(list(prepared.tags)),
            parent=prepared.parent,
            task_id=prepared.task_id,
            metadata=json.dumps(prepared.metadata),
            owner=prepared.owner,
        )

    def get(
        self, artifact_id: str, *, visible_to: str | None = None, owner: str | None = None
    ) -> tuple[Artifact, str]:
        """(artifact, content), the body re-read from disk and its digest verified.

        ``visible_to`` given: an artifact that owner did not store is not found. The artifact is
        shown as ``owner`` stored it, if it did (else as its first store did).
        """
        # The id is checked before anything else, so that no other string can become a path.
        if not _ID.fullmatch(artifact_id):
            raise InvalidParams("an artifact id is 'sha256:' and 64 lowercase hex digits")
        artifact = self._get_row(artifact_id, owner)
        if not self._visible(artifact_id, visible_to):
            raise ArtifactNotFound(f"no artifact {artifact_id}")
        digest = artifact_id.removeprefix("sha256:")
        data = self._read_body(artifact_id, digest)
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._corrupt(artifact_id, digest, "its body does not match its digest")
        return artifact, data.decode("utf-8")

    def list(
        self,
        *,
        kind: str | None,
        tag: str | None,
        task_id: str | None,
        limit: int,
        cursor: str | None,
        visible_to: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[Artifact], str | None]:
        """A page newest first and the next cursor (None at the end); ``visible_to`` given,
        only that owner's artifacts, each as it stored it. ``owner``: whose view to show of an
        artifact it stored (the others as their first store did).

        The cursor is the ``seq`` of the page's last row; the next page holds the older rows.
        """
        if kind is not None and kind not in KINDS:
            raise InvalidParams(f"unknown artifact kind {kind!r}; expected one of {KINDS}")
        if limit < 1:
            raise InvalidParams(f"limit must be at least 1, not {limit}")
        before_seq = None
        if cursor is not None:
            if not _CURSOR.fullmatch(cursor):
                raise InvalidParams(f"malformed cursor {cursor!r}")
            before_seq = min(int(cursor), _MAX_SEQ)
        # One row more than asked tells whether another page follows.
        rows = self._db.list_artifacts(
            kind=kind,
            tag=tag,
            task_id=task_id,
            limit=limit + 1,
            before_seq=before_seq,
            owner=visible_to,
            viewer=owner,
        )
        page = rows[:limit]
        next_cursor = str(page[-1]["seq"]) if len(rows) > limit else None
        return [_artifact(row) for row in page], next_cursor

    # -- helpers ----------------------------------------------------------------------------

    def _get_row(self, artifact_id: str, viewer: str | None = None) -> Artifact:
        row = self._db.get_artifact(artifact_id, viewer)
        if row is None:
            raise ArtifactNotFound(f"no artifact {artifact_id}")
        return _artifact(row)

    def _visible(self, artifact_id: str, owner: str | None) -> bool:
        return owner is None or self._db.artifact_owned_by(artifact_id, owner)

    def _path(self, digest: str) -> Path:
        return self._root / digest[:2] / digest

    def _read_body(self, artifact_id: str, digest: str) -> bytes:
        if self._shared is not None:
            found = self._shared.get_body(digest)
            if found is None:
                raise self._corrupt(artifact_id, digest, "its body is missing")
            return found
        path = self._path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise self._corrupt(artifact_id, digest, "its body is missing") from None
        except OSError as exc:
            raise StorageError(f"cannot read artifact {artifact_id}: {exc}") from exc

    def _write_body(self, digest: str, data: bytes) -> None:
        """Put the body in place durably: temporary file, fsync, rename, fsync the directory
        (on a cluster: a row of the database, committed)."""
        if self._shared is not None:
            self._shared.put_body(digest, data)
            return
        path = self._path(digest)
        try:
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                return
            try:
                path.parent.mkdir(parents=True)
            except FileExistsError:
                pass
            else:
                _fsync_dir(self._root)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{digest}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as tmp:
                    tmp.write(data)
                    tmp.flush()
                    os.fsync(tmp.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            # Disk full, a file-size limit, an I/O error: logged and counted here, once, for
            # every writer (the API answers 500; a task's trace is left out, the task ends).
            log.error(
                "cannot write artifact sha256:%s (%d bytes): %s",
                digest,
                len(data),
                exc.strerror or exc,
                extra={"event": "artifact_write_failed", "errno": exc.errno},
            )
            if self._metrics is not None:
                self._metrics.inc("llorch_artifact_write_failures_total")
            raise StorageError(f"cannot write artifact sha256:{digest}: {exc.strerror}") from exc

    def _corrupt(self, artifact_id: str, digest: str, reason: str) -> ArtifactCorrupt:
        where = "the database" if self._shared is not None else self._path(digest)
        log.error("artifact %s is corrupt: %s (%s)", artifact_id, reason, where)
        # The path stays in the log: a client learns nothing about the server's disk.
        return ArtifactCorrupt(f"artifact {artifact_id} is corrupt: {reason}")


def _artifact(row: Mapping[str, Any]) -> Artifact:
    return Artifact(
        id=row["artifact_id"],
        digest=row["digest"],
        kind=row["kind"],
        size_bytes=row["size_bytes"],
        created_ms=row["created_ms"],
        tags=tuple(json.loads(row["tags"])),
        parent=row["parent"],
        task_id=row["task_id"],
        metadata=MappingProxyType(json.loads(row["metadata"])),
    )


def _check_text(value: object) -> None:
    # Tags, metadata and the task id are echoed in JSON answers: they must be encodable strings.
    if not isinstance(value, str):
        raise InvalidParams(f"artifact tags and metadata are strings, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParams(
            f"artifact tags and metadata must be valid Unicode: {exc.reason}"
        ) from exc


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a crash (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
