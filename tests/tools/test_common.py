"""The exit contract every tool shares with xtask.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.common import TaskError, UsageError, main

ROOT = Path(__file__).resolve().parents[2]


def test_a_task_error_is_exit_1_with_the_command_named(capsys: pytest.CaptureFixture[str]) -> None:
    def fails(_args: list[str]) -> int:
        raise TaskError("the thing is missing")

    assert main("thing", fails, []) == 1
    assert capsys.readouterr().err == "xtask: thing: the thing is missing\n"


def test_a_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def refuses(args: list[str]) -> int:
        raise UsageError(f"thing takes no arguments (got {' '.join(args)})")

    assert main("thing", refuses, ["x"]) == 2
    assert "thing takes no arguments (got x)" in capsys.readouterr().err
    assert main("thing", lambda args: len(args), ["a", "b"]) == 2


def test_xtask_runs_a_tool_in_the_venv_and_keeps_its_exit_status() -> None:
    # The venv's interpreter is the one xtask's stamp was made with: it keeps .venv as it is.
    done = subprocess.run(
        [sys.executable, str(ROOT / "xtask.py"), "spec-extract", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "==> spec-extract --check" in done.stdout
    refused = subprocess.run(
        [sys.executable, str(ROOT / "xtask.py"), "metrics-lint", "extra"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2
    assert "metrics-lint takes no arguments (got extra)" in refused.stderr
