"""What several instances on one database share beyond the rows of :class:`Storage`: the
control plane's desired state of each pool, the live instances, and artifact bodies.

:attr:`Storage.cluster` is None on SQLite (one process: nothing to share) and a
:class:`Cluster` on PostgreSQL (:class:`llorch.persistence.pg_control.PgCluster`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PoolControl:
    """A pool's desired state, as the last drain, resume or reload on any instance left it."""

    pool_id: str
    generation: int
    draining: bool
    # What is left of the drain's deadline now (by the database's clock), never below 0.
    drain_left_ms: int
    # The model the last reload asked for (None: never reloaded).
    model: str | None


class Cluster(Protocol):
    def pool_controls(self) -> list[PoolControl]:
        """Every pool's desired state."""
        ...

    def set_pool_control(
        self,
        pool_id: str,
        *,
        draining: bool | None = None,
        drain_deadline_ms: int | None = None,
        model: str | None = None,
    ) -> int:
        """Record an operation on the pool (the fields not given kept); its new generation."""
        ...

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """The cluster's queued tasks by (pool_id, priority)."""
        ...

    def live_instances(self) -> int:
        """How many instances' heartbeats have not expired (this one included, at least 1)."""
        ...

    def put_body(self, digest: str, data: bytes) -> None:
        """Store an artifact body (a no-op when that digest is stored already)."""
        ...

    def get_body(self, digest: str) -> bytes | None:
        """An artifact body, or None when it is not stored."""
        ...
