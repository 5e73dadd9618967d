from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from llorch.config import Settings
from tests.support import make_settings

SettingsFactory = Callable[..., Settings]

# Records the (operationId, status) of every answer (for `xtask.py status-coverage`).
pytest_plugins = ["tests.plugins.status_recorder"]


@pytest.fixture
def settings_for(tmp_path: Path) -> SettingsFactory:
    """Build test-profile settings from a configuration mapping, in a fresh data dir."""

    def build(raw: Mapping[str, Any] | None = None) -> Settings:
        return make_settings(tmp_path, raw)

    return build
