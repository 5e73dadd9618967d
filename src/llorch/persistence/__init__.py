"""SQLite persistence: numbered migrations, profile guard, and the rows llorch keeps."""

from llorch.persistence.db import ArtifactInsert, Database, SessionRow, TaskRow

__all__ = ["ArtifactInsert", "Database", "SessionRow", "TaskRow"]
