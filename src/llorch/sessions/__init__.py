"""Sessions (TTL from last use, turn cap, affinity) and their budgets (reserve, commit, release)."""

from llorch.sessions.service import Reservation, Session, SessionService, Settled

__all__ = ["Reservation", "Session", "SessionService", "Settled"]
