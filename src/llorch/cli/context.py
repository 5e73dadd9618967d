"""What every command shares: the server's address and key, and error handling."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import typer

from llorch.cli.output import Output
from llorch.client import DEFAULT_URL, Client, ClientError, Options

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


@dataclass(frozen=True)
class Target:
    """The server a command talks to (from --url / --api-key or LLORCH_URL / LLORCH_API_KEY)."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    wait_s: float = 0.0

    def client(self) -> Client:
        return Client(Options(base_url=self.url, api_key=self.api_key, wait_s=self.wait_s))


def target(ctx: typer.Context) -> Target:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Target) else Target()


@contextmanager
def session(ctx: typer.Context, output: Output) -> Iterator[Client]:
    """A client for the command; any client error ends the command with its exit code."""
    try:
        with target(ctx).client() as client:
            yield client
    except ClientError as error:
        output.fail(error)
