from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from llorch.config import Settings
from tests.support import make_settings
from tools.postgres import private_cluster

SettingsFactory = Callable[..., Settings]
# Makes a new, empty PostgreSQL database and returns its URL.
DatabaseFactory = Callable[[], str]

# Records the (operationId, status) of every answer (for `xtask.py status-coverage`).
pytest_plugins = ["tests.plugins.status_recorder"]


@pytest.fixture
def settings_for(tmp_path: Path) -> SettingsFactory:
    """Build test-profile settings from a configuration mapping, in a fresh data dir."""

    def build(raw: Mapping[str, Any] | None = None) -> Settings:
        return make_settings(tmp_path, raw)

    return build


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[DatabaseFactory]:
    """One PostgreSQL server for the whole run, started only when a test asks for it: a private
    cluster (tools/postgres.py, ~1 s), or the server ``LLORCH_TEST_DATABASE_URL`` names. Each
    call makes a new database on it."""
    external = os.environ.get("LLORCH_TEST_DATABASE_URL")
    if external:
        yield lambda: _create_database(external)
        return
    with private_cluster() as pg:
        yield lambda: pg.create_database(f"t_{secrets.token_hex(6)}")


@pytest.fixture
def postgres_url(postgres_server: DatabaseFactory) -> Iterator[str]:
    """The URL of a new, empty database of its own for this test (dropped afterwards on a
    server of LLORCH_TEST_DATABASE_URL; a private cluster goes away with its directory)."""
    url = postgres_server()
    yield url
    external = os.environ.get("LLORCH_TEST_DATABASE_URL")
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')


def _create_database(server_url: str) -> str:
    name = f"llorch_t_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlsplit(server_url)._replace(path=f"/{name}").geturl()
