"""What every tool shares: the repository's paths, its console lines and the exit contract.

A tool prints ``==> step`` lines on stdout and ``xtask: message`` lines on stderr, as xtask.py
does; a :class:`TaskError` ends it with its message and exit status 1, a :class:`UsageError`
with status 2 (:func:`main`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TaskError(Exception):
    """A failure that ends the command with a message and exit status 1."""


class UsageError(Exception):
    """Bad command line: exit status 2."""


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def note(message: str) -> None:
    print(f"xtask: {message}", file=sys.stderr, flush=True)


def rel(path: Path, root: Path = ROOT) -> str:
    """``path`` relative to ``root`` (the repository), with forward slashes; a path outside it
    as it is."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def no_args(command: str, args: Sequence[str]) -> None:
    if args:
        raise UsageError(f"{command} takes no arguments (got {' '.join(args)})")


def run(
    cmd: Sequence[str | Path],
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> int:
    """Run a command from the repository root without stdin; return its exit status.

    `quiet` keeps the command's output unless it fails.
    """
    argv = [str(part) for part in cmd]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        proc = subprocess.run(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None,
            env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise TaskError(f"cannot run {argv[0]}: {exc}") from exc
    if quiet and proc.returncode != 0:
        sys.stdout.write(proc.stdout.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    if check and proc.returncode != 0:
        raise TaskError(f"`{' '.join(argv)}` exited with {proc.returncode}")
    return proc.returncode


def venv_tool(name: str) -> Path:
    """A console script of the running interpreter's environment (``.venv/bin/NAME``)."""
    return Path(sys.executable).parent / name


def main(command: str, action: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run ``action(args)`` with xtask's exit contract: 1 on TaskError, 2 on UsageError."""
    args = sys.argv[1:] if argv is None else argv
    try:
        return action(args)
    except UsageError as exc:
        note(str(exc))
        return 2
    except TaskError as exc:
        note(f"{command}: {exc}")
        return 1
    except KeyboardInterrupt:
        note("interrupted")
        return 130
