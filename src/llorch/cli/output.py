"""How the CLI prints: human output with rich by default, JSON for scripts, and one exit code per
error class."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from llorch.client import (
    ApiError,
    AuthError,
    ClientError,
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    ServerError,
    StreamFailed,
    TransportError,
    Unavailable,
)

# The exit codes, by error class (listed in `llorch --help`).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INVALID = 4
EXIT_AUTH = 5
EXIT_NOT_FOUND = 6
EXIT_CONFLICT = 7
EXIT_BUSY = 8
EXIT_SERVER = 9
EXIT_TASK_FAILED = 10
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""Exit codes:
{EXIT_OK} success;
{EXIT_ERROR} unexpected answer;
{EXIT_USAGE} bad command line;
{EXIT_UNREACHABLE} server unreachable;
{EXIT_INVALID} invalid request (400, 413, 415);
{EXIT_AUTH} not authenticated or not allowed (401, 403);
{EXIT_NOT_FOUND} not found (404);
{EXIT_CONFLICT} conflict (409);
{EXIT_BUSY} busy, try later: queue full, budget exhausted, rate limited, unavailable (429, 503);
{EXIT_SERVER} server error (5xx);
{EXIT_TASK_FAILED} the task failed (its stream ended with an error);
{EXIT_INTERRUPTED} interrupted (Ctrl-C; a submitted task is canceled)."""

_EXIT_BY_CLASS: Sequence[tuple[type[ClientError], int]] = (
    (TransportError, EXIT_UNREACHABLE),
    (InvalidRequest, EXIT_INVALID),
    (AuthError, EXIT_AUTH),
    (NotFound, EXIT_NOT_FOUND),
    (Conflict, EXIT_CONFLICT),
    (Overloaded, EXIT_BUSY),
    (Unavailable, EXIT_BUSY),
    (ServerError, EXIT_SERVER),
    (StreamFailed, EXIT_TASK_FAILED),
)


def exit_code(error: ClientError) -> int:
    return next((code for kind, code in _EXIT_BY_CLASS if isinstance(error, kind)), EXIT_ERROR)


@dataclass
class Output:
    """Where results and errors go; ``json`` switches every command to machine output."""

    json: bool = False
    out: Console | None = None
    err: Console | None = None

    def __post_init__(self) -> None:
        self.out = self.out or Console(highlight=False, soft_wrap=True)
        self.err = self.err or Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def stdout(self) -> Console:
        assert self.out is not None
        return self.out

    @property
    def stderr(self) -> Console:
        assert self.err is not None
        return self.err

    def emit_json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, sort_keys=True) + "\n")
        sys.stdout.flush()

    def record(self, title: str, fields: Mapping[str, Any], raw: Any) -> None:
        """One object: key/value lines for humans, the server's JSON for scripts."""
        if self.json:
            self.emit_json(raw)
            return
        self.stdout.print(f"[bold]{title}[/bold]")
        width = max((len(k) for k in fields), default=0)
        for key, value in fields.items():
            self.stdout.print(f"  {key:<{width}}  {_show(value)}", markup=False)

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]], raw: Any) -> None:
        if self.json:
            self.emit_json(raw)
            return
        table = Table(*columns, box=None, pad_edge=False)
        for row in rows:
            table.add_row(*(_show(v) for v in row))
        self.stdout.print(table)

    def done(self, message: str, raw: Any = None) -> None:
        if self.json:
            self.emit_json(raw if raw is not None else {"ok": True})
        else:
            self.stdout.print(message, markup=False)

    def fail(self, error: ClientError) -> NoReturn:
        """Print the server's code and message (never a traceback) and exit by error class."""
        if self.json:
            body: dict[str, Any] = {"code": error.code, "message": error.message}
            if isinstance(error, ApiError):
                body = {"status": error.status, **error.envelope}
            self.emit_json({"error": body})
        else:
            prefix = f"{error.status} " if isinstance(error, ApiError) else ""
            hint = ""
            if error.retriable and error.retry_after_s is not None:
                hint = f" (retriable; retry after {error.retry_after_s:g} s)"
            elif error.retriable:
                hint = " (retriable)"
            self.stderr.print(
                f"[red]error:[/red] {prefix}{error.code}: {error.message}{hint}", highlight=False
            )
        raise typer.Exit(exit_code(error))


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_show(v) for v in value) or "-"
    return str(value)
