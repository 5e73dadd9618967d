from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pact.scenarios import SCENARIOS

# pact's FFI otherwise looks up a metrics host (these machines are offline).
os.environ.setdefault("PACT_DO_NOT_TRACK", "true")

ROOT = Path(__file__).resolve().parents[2]
PACT_FILE = ROOT / "contracts" / "pacts" / "llorch-cli-llorch.json"


@pytest.fixture(scope="session")
def pact_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the consumer tests write; the committed pact is replaced only by a complete run."""
    out = tmp_path_factory.mktemp("pacts")
    yield out
    written = out / PACT_FILE.name
    if not written.is_file():
        return
    interactions = json.loads(written.read_text(encoding="utf-8"))["interactions"]
    if len(interactions) == len(SCENARIOS):
        PACT_FILE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, PACT_FILE)
