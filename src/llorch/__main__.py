"""``python -m llorch serve``: run the server (embedded default: SQLite and the mock engine)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from llorch.api import create_app, logs
from llorch.api.http import HttpLimits, protocol_class, raise_descriptor_limit
from llorch.api.runtime import Runtime
from llorch.config import Settings
from llorch.contracts import ConfigError, load_config
from llorch.errors import StorageError
from llorch.persistence.db import check_database

log = logging.getLogger("llorch")


class GracefulServer(uvicorn.Server):
    """uvicorn, with llorch's shutdown first: on SIGTERM or SIGINT the server keeps its listener
    open and answers new tasks 503 SHUTTING_DOWN while running tasks get the grace period; only
    then does uvicorn stop. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quiescing: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None or self._quiescing is not None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        # A signal handler may not touch the loop directly.
        self._loop.call_soon_threadsafe(self._begin_quiesce, sig)

    def _begin_quiesce(self, sig: int) -> None:
        log.info("%s: shutting down gracefully", signal.Signals(sig).name)
        self._quiescing = asyncio.get_running_loop().create_task(self._quiesce())

    async def _quiesce(self) -> None:
        try:
            await self._runtime.scheduler.quiesce()
        finally:
            self.should_exit = True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llorch")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the orchestrator")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--profile", choices=["dev", "test", "prod"])
    serve.add_argument("--data-dir")
    args = parser.parse_args(argv)

    logs.configure()
    try:
        settings = load_config(args.config) if args.config else Settings()
        settings = settings.with_overrides(os.environ)
    except (ConfigError, ValueError) as exc:
        print(f"llorch: {exc}", file=sys.stderr)
        return 2
    overrides = {
        "host": args.host,
        "port": args.port,
        "profile": args.profile,
        "data_dir": args.data_dir,
    }
    settings = settings.with_server(**{k: v for k, v in overrides.items() if v is not None})
    try:
        # The database opens in the app's lifespan, where a failure is uvicorn's traceback.
        if settings.database.url is None:  # SQLite: its file is checked before anything opens it
            check_database(settings.database_path)
    except StorageError as exc:  # an empty or corrupt file
        print(f"llorch: {exc}", file=sys.stderr)
        return 2
    raise_descriptor_limit()  # before the connection cap is derived from it
    try:
        app = create_app(settings)
    except ValueError as exc:  # e.g. a non-loopback bind without API keys
        print(f"llorch: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="info",
        log_config=None,  # keep llorch's JSON handler
        http=protocol_class(HttpLimits.from_settings(settings)),
        # Tasks are already drained when uvicorn stops; streams of queued tasks end here.
        timeout_graceful_shutdown=2,
    )
    GracefulServer(config, app.runtime).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
