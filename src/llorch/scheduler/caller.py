"""Who is calling: the one type the edge authenticates and the scheduler decides visibility by.

The edge (``api/auth.py``) builds a :class:`Caller` from the bearer key; handlers pass it down,
and every "may this caller see that owner's task, session or artifact" question is answered by
:meth:`Caller.can_see` or, as a filter, :attr:`Caller.visible_to`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from llorch.config import SCOPES, Budget


@dataclass(frozen=True)
class Caller:
    """A caller: its key's ``name`` (None when authentication is off), scopes and budgets (the
    caps of a session it opens), and the request's headers (a pool may name its fairness flows
    by a header)."""

    name: str | None = None
    scopes: frozenset[str] = frozenset()
    budgets: Budget | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def owner(self) -> str | None:
        """What the resources this caller creates are owned by."""
        return self.name

    @property
    def sees_all(self) -> bool:
        """The control scope (or no authentication at all) sees every key's resources."""
        return self.name is None or "control" in self.scopes

    @property
    def visible_to(self) -> str | None:
        """The owner to filter on, or None to see everything."""
        return None if self.sees_all else self.name

    def can_see(self, owner: str | None) -> bool:
        return self.sees_all or owner == self.name


# Authentication is off: every resource is visible, every scope allowed.
ANYONE = Caller(name=None, scopes=frozenset(SCOPES))
# A request that skipped authentication (a public operation): it sees nobody's resources.
NOBODY = Caller(name="", scopes=frozenset())
