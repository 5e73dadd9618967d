"""An incremental Server-Sent Events parser (the parts of the WHATWG algorithm llorch uses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llorch.client.errors import ProtocolError

TERMINAL = frozenset({"end", "error"})


@dataclass(frozen=True)
class Event:
    """One frame of a task's stream: ``started``, ``token``, ``metrics``, ``end`` or ``error``."""

    id: int
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL


class SseParser:
    """Feed it lines (without their line ending); it yields an Event at each blank line.

    Comment lines (``: heartbeat``) are skipped; a block without ``event`` is ignored.
    """

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}

    def feed(self, line: str) -> Iterator[Event]:
        if line == "":
            fields, self._fields = self._fields, {}
            if "event" in fields:
                yield _event(fields)
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        self._fields[name] = value[1:] if value.startswith(" ") else value


def _event(fields: dict[str, str]) -> Event:
    try:
        data = json.loads(fields.get("data", "{}"))
        seq = int(fields["id"])
    except (KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed SSE frame {fields!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"SSE data is not a JSON object: {fields['data']!r}")
    return Event(seq, fields["event"], data)


def parse(text: str) -> list[Event]:
    """Every event of a whole SSE body."""
    parser = SseParser()
    events: list[Event] = []
    for line in [*text.splitlines(), ""]:
        events.extend(parser.feed(line))
    return events
