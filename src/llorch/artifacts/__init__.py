"""The content-addressed artifact store: bodies as files named by sha256, metadata in SQLite."""

from llorch.artifacts.redact import redact
from llorch.artifacts.store import Artifact, ArtifactStore

__all__ = ["Artifact", "ArtifactStore", "redact"]
