"""Several ``llorch serve`` processes on one PostgreSQL database, for the cluster tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support import serve_process


def cluster_config(
    path: Path, database_url: str, instance_id: str, pools: list[dict[str, Any]], **extra: Any
) -> Path:
    """The configuration file of one instance of the cluster."""
    config: dict[str, Any] = {
        "server": {"shutdown_grace_s": 0},
        "database": {"url": database_url, "instance_id": instance_id, "retry_ms": 100},
        "pools": pools,
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def database_fault_config(
    path: Path, database: dict[str, Any], server: dict[str, Any] | None = None
) -> Path:
    """One instance for the database-fault tests: one replica of two slots whose tasks run
    for a while (40 tokens a second, no end of their own), the others waiting in the queue."""
    pool = {
        "id": "default",
        "model": "mock-small",
        "replicas": 1,
        "slots_per_replica": 2,
        "max_tokens_out": 4000,
        "mock": {"ttft_ms": 0, "tokens_per_s": 40, "eos": False},
    }
    config = {"server": {"shutdown_grace_s": 0, **(server or {})}, "database": database}
    path.write_text(yaml.safe_dump(config | {"pools": [pool]}))
    return path


@contextmanager
def instances(
    tmp_path: Path,
    database_url: str,
    pools: list[dict[str, Any]],
    count: int,
    prefix: str = "i",
    **extra: Any,
) -> Iterator[list[httpx.Client]]:
    """``count`` instances (ids i0, i1, … with the default ``prefix``) started one after
    another, a client of each."""
    with ExitStack() as stack:
        clients = []
        for n in range(count):
            name = f"{prefix}{n}"
            config = cluster_config(tmp_path / f"{name}.yaml", database_url, name, pools, **extra)
            url, _, _ = stack.enter_context(
                serve_process("--config", str(config), data_dir=tmp_path / name)
            )
            clients.append(stack.enter_context(httpx.Client(base_url=url, timeout=60)))
        yield clients
