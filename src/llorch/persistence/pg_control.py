"""The shared state of the instances on one PostgreSQL database (:class:`Cluster`): pool
control (ORCH-STATE-0052), the live instance count (ORCH-STATE-0053) and artifact bodies
(ORCH-STATE-0054). The calls go through the store's connections and error translation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from llorch.persistence.cluster import PoolControl

NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"

_CONTROLS = (
    "SELECT pool_id, generation, draining, "
    f"GREATEST(0, drain_deadline_ms - ({NOW_MS} - updated_ms)), model FROM pool_control"
)
_SET = (
    "INSERT INTO pool_control (pool_id, generation, draining, drain_deadline_ms, model, "
    f"updated_ms) VALUES (%(pool)s, 1, COALESCE(%(draining)s, false), "
    f"COALESCE(%(deadline)s, 0), %(model)s, {NOW_MS}) "
    "ON CONFLICT (pool_id) DO UPDATE SET generation = pool_control.generation + 1, "
    "draining = COALESCE(%(draining)s, pool_control.draining), "
    "drain_deadline_ms = COALESCE(%(deadline)s, pool_control.drain_deadline_ms), "
    "model = COALESCE(%(model)s, pool_control.model), updated_ms = EXCLUDED.updated_ms "
    "RETURNING generation"
)
_LIVE = f"SELECT count(*) FROM instances WHERE heartbeat_ms > {NOW_MS} - %s"

Connect = Callable[[], AbstractContextManager[psycopg.Connection[tuple[Any, ...]]]]


class PgCluster:
    def __init__(self, connect: Connect, write: Callable[[], AbstractContextManager[None]],
                 instance_ttl_ms: int) -> None:  # fmt: skip
        self._connect = connect
        self._write = write
        self._ttl_ms = instance_ttl_ms

    def pool_controls(self) -> list[PoolControl]:
        with self._connect() as conn:
            found = conn.execute(_CONTROLS).fetchall()
        return [PoolControl(str(p), int(g), bool(d), int(left), m) for p, g, d, left, m in found]

    def set_pool_control(
        self,
        pool_id: str,
        *,
        draining: bool | None = None,
        drain_deadline_ms: int | None = None,
        model: str | None = None,
    ) -> int:
        values = {"pool": pool_id, "draining": draining, "deadline": drain_deadline_ms,
                  "model": model}  # fmt: skip
        with self._write(), self._connect() as conn:
            found = conn.execute(_SET, values).fetchone()
        return int(found[0]) if found else 0

    def queue_depths(self) -> dict[tuple[str, str], int]:
        with self._connect() as conn:
            found = conn.execute(
                "SELECT pool_id, priority, count(*) FROM tasks WHERE state = 'queued' "
                "GROUP BY pool_id, priority"
            ).fetchall()
        return {(str(p), str(q)): int(n) for p, q, n in found}

    def live_instances(self) -> int:
        with self._connect() as conn:
            found = conn.execute(_LIVE, (self._ttl_ms,)).fetchone()
        return max(1, int(found[0]) if found else 1)

    def put_body(self, digest: str, data: bytes) -> None:
        with self._write(), self._connect() as conn:
            conn.execute(
                "INSERT INTO artifact_bodies (digest, body) VALUES (%s, %s) "
                "ON CONFLICT (digest) DO NOTHING",
                (digest, data),
            )

    def get_body(self, digest: str) -> bytes | None:
        with self._connect() as conn:
            found = conn.execute(
                "SELECT body FROM artifact_bodies WHERE digest = %s", (digest,)
            ).fetchone()
        return bytes(found[0]) if found else None
