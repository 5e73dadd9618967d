"""Persistence: the storage interface (:class:`Storage`), its SQLite implementation
(:class:`Database`: numbered migrations, profile guard) and the rows llorch keeps."""

from llorch.persistence.db import ArtifactInsert, Database, SessionRow, TaskRow
from llorch.persistence.storage import Storage, when_free

__all__ = ["ArtifactInsert", "Database", "SessionRow", "Storage", "TaskRow", "when_free"]
