"""Persistence: the storage interface (:class:`Storage`, opened by :func:`open_storage`), its
SQLite implementation (:class:`Database`: numbered migrations, profile guard), its PostgreSQL
implementation (:mod:`llorch.persistence.postgres`) and the rows llorch keeps."""

from llorch.persistence.cluster import Cluster, PoolControl
from llorch.persistence.db import Database
from llorch.persistence.rows import (
    ArtifactInsert,
    EndedElsewhere,
    Reservation,
    SessionRow,
    TaskRow,
)
from llorch.persistence.storage import Storage, open_storage, retry_busy, when_free

__all__ = [
    "ArtifactInsert",
    "Cluster",
    "Database",
    "EndedElsewhere",
    "PoolControl",
    "Reservation",
    "SessionRow",
    "Storage",
    "TaskRow",
    "open_storage",
    "retry_busy",
    "when_free",
]
