"""The `llorch` command line. It imports only `llorch.client`; import-linter holds it to that."""

from llorch.cli.app import app, main

__all__ = ["app", "main"]
