"""status-coverage: which declared (operation, status) pairs the pact holds."""

from __future__ import annotations

import json
from pathlib import Path

from tools.status_coverage import pact_statuses, recorded_statuses


def test_an_interaction_counts_when_its_description_and_status_agree(tmp_path: Path) -> None:
    interactions = [
        {"description": "createTask answered 202 (accepted) ...", "response": {"status": 202}},
        # The description promises 404 but the response is 200: it covers neither.
        {"description": "getTask answered 404 (not found)", "response": {"status": 200}},
        {"description": "something else", "response": {"status": 500}},
    ]
    (tmp_path / "a.json").write_text(json.dumps({"interactions": interactions}))
    assert pact_statuses(tmp_path) == {("createTask", 202)}


def test_recorded_statuses_are_read_back(tmp_path: Path) -> None:
    record = tmp_path / "recorded.json"
    assert recorded_statuses(record) == set()
    record.write_text(json.dumps({"pairs": [["getTask", 200], ["cancelTask", "204"]]}))
    assert recorded_statuses(record) == {("getTask", 200), ("cancelTask", 204)}
