"""Cache-aware placement: which replica with a free slot a task goes to, and why.

In order: the session's replica (its KV cache holds the conversation); else the replica that most
recently served the longest prefix of the task's prompt (its prompt cache may hold it); else the
least loaded, with a random tie-break so that misses spread instead of piling onto the first
replica. Only replicas with a free slot are candidates, so a warm cache never overloads one
replica: when it is full the task goes elsewhere. A candidate's load is llorch's busy share of its
slots, or the engine's own account when it reports a higher one; a replica whose engine says it
is full (a load of 1 or more: every slot busy, or requests waiting inside it) loses its session
and prefix preference while another candidate is not full (ORCH-ENG-0025).

Prefixes are hashed in blocks of ``block_chars`` characters, each hash chained to the one before
(so a block's hash names the whole prefix up to it), into a map from hash to replica id that
is bounded by ``max_bytes`` and evicts the least recently used entry first.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llorch.engines.base import CompletionRequest

Reason = Literal["session", "prefix", "least_loaded"]
REASONS: tuple[Reason, ...] = ("session", "prefix", "least_loaded")

# What one entry of the map costs, measured with tracemalloc on CPython (an int key and a
# shared replica id in an OrderedDict: 110-150 bytes), with room for the table's growth.
ENTRY_BYTES = 200


@dataclass(frozen=True)
class Candidate:
    """A replica with a free slot, as placement sees it."""

    replica_id: str
    load: float  # busy slots / total slots, or the engine's own higher account


@dataclass(frozen=True)
class Decision:
    index: int  # into the candidates
    reason: Reason
    prefix_blocks: int = 0  # blocks of the prompt the chosen replica served last


def prompt_text(request: CompletionRequest) -> str:
    """The text an engine's prompt cache sees first: the prompt, or the messages in order."""
    if request.prompt is not None:
        return request.prompt
    return "".join(f"\x1e{m.role}\x1f{m.content}" for m in request.messages or ())


class PrefixMap:
    """Prefix block hash → the replica that served it last; LRU, bounded in bytes."""

    def __init__(self, *, block_chars: int, max_bytes: int) -> None:
        self.block_chars = block_chars
        self.max_entries = max(0, max_bytes // ENTRY_BYTES)
        self._last: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    @property
    def bytes_used(self) -> int:
        return len(self._last) * ENTRY_BYTES

    def hashes(self, text: str) -> list[int]:
        """One chained hash per full block of ``text`` (a partial last block is not cached)."""
        out: list[int] = []
        digest = b""
        data = text.encode("utf-8", "surrogatepass")
        size = self.block_chars
        for start in range(0, len(data) - size + 1, size):
            digest = hashlib.blake2b(digest + data[start : start + size], digest_size=8).digest()
            out.append(int.from_bytes(digest, "big"))
        return out

    def longest(self, hashes: Sequence[int], among: set[str]) -> tuple[str, int] | None:
        """The replica of ``among`` that served the longest prefix last, and its length."""
        for blocks in range(len(hashes), 0, -1):
            replica_id = self._last.get(hashes[blocks - 1])
            if replica_id is not None and replica_id in among:
                return replica_id, blocks
        return None

    def record(self, hashes: Sequence[int], replica_id: str) -> None:
        """``replica_id`` served these prefixes now (the longest is the most recent entry)."""
        if self.max_entries == 0:
            return
        for digest in hashes[-self.max_entries :]:
            self._last[digest] = replica_id
            self._last.move_to_end(digest)
        while len(self._last) > self.max_entries:
            self._last.popitem(last=False)


def choose(
    candidates: Sequence[Candidate],
    *,
    session_replica_id: str | None,
    hashes: Sequence[int],
    prefixes: PrefixMap,
    rng: random.Random | None,
) -> Decision | None:
    """The placement of one task among ``candidates``, or None when there is none; ties of
    load are broken by ``rng``, or by the candidates' order without one."""
    if not candidates:
        return None
    ids = [c.replica_id for c in candidates]
    # Warm caches are preferred only among replicas not full by their engine's own account.
    room = {c.replica_id for c in candidates if c.load < 1} or set(ids)
    if session_replica_id is not None and session_replica_id in room:
        return Decision(ids.index(session_replica_id), "session")
    found = prefixes.longest(hashes, room) if hashes else None
    if found is not None:
        return Decision(ids.index(found[0]), "prefix", found[1])
    lowest = min(c.load for c in candidates)
    tied = [i for i, c in enumerate(candidates) if c.load == lowest]
    return Decision(rng.choice(tied) if rng else tied[0], "least_loaded")
