"""The HTTP edge: connexion wiring, handlers bound by operationId, errors, SSE."""

from llorch.api.app import create_app

__all__ = ["create_app"]
