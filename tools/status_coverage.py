"""``xtask.py status-coverage``: every declared (operation, status) is covered.

A pair is covered when the pact holds an interaction named ``"<operationId> answered <status> "``
with that status, or when a test received that answer (tests/plugins/status_recorder.py writes
them to ``var/status-coverage/recorded.json`` during ``xtask.py test``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.plugins.status_recorder import RECORD, declared

from tools.common import ROOT, main, no_args, note, rel

PACT_DIR = ROOT / "contracts" / "pacts"
_PACT_DESCRIPTION_RE = re.compile(r"^(\w+) answered (\d{3}) ")


def pact_statuses(pact_dir: Path = PACT_DIR) -> set[tuple[str, int]]:
    """The (operation, status) pairs of the pact interactions whose description names them."""
    found: set[tuple[str, int]] = set()
    for path in sorted(pact_dir.glob("*.json")):
        for interaction in json.loads(path.read_text(encoding="utf-8")).get("interactions", []):
            match = _PACT_DESCRIPTION_RE.match(interaction.get("description", ""))
            status = interaction.get("response", {}).get("status")
            if match is not None and status == int(match.group(2)):
                found.add((match.group(1), status))
    return found


def recorded_statuses(record: Path = RECORD) -> set[tuple[str, int]]:
    if not record.is_file():
        note(f"no {rel(record)}: run `python3 xtask.py test` first")
        return set()
    data = json.loads(record.read_text(encoding="utf-8"))
    return {(op, int(status)) for op, status in data.get("pairs", [])}


def cmd_status_coverage(args: list[str]) -> int:
    no_args("status-coverage", args)
    wanted = declared()
    in_pact = pact_statuses()
    recorded = recorded_statuses()
    uncovered = sorted(wanted - in_pact - recorded)
    print(
        f"status coverage: {len(wanted)} declared (operation, status) pairs; "
        f"{len(wanted & in_pact)} in the pact, {len(wanted & recorded)} received by tests, "
        f"{len(uncovered)} uncovered"
    )
    for operation, status in uncovered:
        print(f"  uncovered: {operation} {status}")
    return 1 if uncovered else 0


if __name__ == "__main__":
    raise SystemExit(main("status-coverage", cmd_status_coverage))
