"""SQLite persistence: numbered migrations, profile guard, and the rows llorch keeps."""

from llorch.persistence.db import Database, SessionRow, TaskRow

__all__ = ["Database", "SessionRow", "TaskRow"]
