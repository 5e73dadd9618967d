"""``python -m llorch serve``: run the server (embedded default: SQLite and the mock engine)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from llorch.api import create_app
from llorch.config import Settings
from llorch.contracts import ConfigError, load_config


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

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.server.shutdown_grace_s) + 5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
