"""The `llorch` command: the server (`llorch serve`) and a client of both planes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from llorch.cli import resources, tasks
from llorch.cli.context import Target
from llorch.cli.output import EXIT_CODES_HELP
from llorch.client import DEFAULT_URL

app = typer.Typer(
    name="llorch",
    help="llorch: a contract-first orchestrator for LLM inference.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main_options(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="LLORCH_URL", help="The server's base URL.")
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LLORCH_API_KEY", help="Sent as Authorization: Bearer KEY."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            min=0, help="On 429/503, wait as Retry-After advises, for at most this many seconds."
        ),
    ] = 0.0,
) -> None:
    ctx.obj = Target(url=url.rstrip("/"), api_key=api_key or None, wait_s=wait)


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="YAML configuration file.", exists=True, dir_okay=False)
    ] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535)] = None,
    profile: Annotated[str | None, typer.Option(help="dev, test or prod.")] = None,
    data_dir: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Run the server (`python -m llorch serve`) in place of this process."""
    argv = [sys.executable, "-m", "llorch", "serve"]
    for flag, value in (
        ("--config", config),
        ("--host", host),
        ("--port", port),
        ("--profile", profile),
        ("--data-dir", data_dir),
    ):
        if value is not None:
            argv += [flag, str(value)]
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process, so that Ctrl-C and SIGTERM reach the server directly.
    os.execv(sys.executable, argv)


app.command("submit")(tasks.submit)
app.command("caps")(resources.caps)
app.add_typer(tasks.app, name="tasks")
app.add_typer(resources.sessions, name="sessions")
app.add_typer(resources.artifacts, name="artifacts")
app.add_typer(resources.pools, name="pools")


def main() -> None:
    app()
