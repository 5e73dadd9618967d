#!/usr/bin/env python3
"""Every developer action for llorch, and the only thing CI calls.

Usage: python3 xtask.py COMMAND [ARGS...]

    serve [ARGS...]        run the server: .venv/bin/python -m llorch serve ARGS...
    lint                   ruff check, ruff format --check, mypy (strict), lint-imports
    metrics-lint           every metric and label of ci/dashboards/*.json and ci/alerts/llorch.yaml
                           is in contracts/metrics.yaml; promtool check rules and test rules
                           (installs promtool with apt-get when it is not on PATH)
    fmt                    ruff check --fix, then ruff format
    test [PYTEST ARGS...]  pytest over tests/ with branch coverage and the coverage floor
                           (pass --cov-fail-under=0 to run a subset without the floor)
    spec-extract [--check] .specs/*.md -> requirements/*.yaml; --check fails when
                           requirements/ is stale or a MUST requirement has no test
    contract               schemathesis CLI against a live server on a free loopback port
    pact-verify            verify contracts/pacts/*.json against the real app (test profile,
                           tests/configs/pact.yaml) wrapped with the provider-state route of
                           tests/pact/provider_states.py; with
                           PACT_BROKER_BASE_URL set, also verify the broker's pacts for llorch
                           and publish the results (version: git describe, and the git branch)
    suites-postgres        contract and pact-verify once more, each against a server on a new
                           PostgreSQL database (a private cluster the run starts, or the server
                           LLORCH_TEST_DATABASE_URL names)
    pact-publish           publish contracts/pacts/*.json to the Pact Broker at
                           PACT_BROKER_BASE_URL (bearer token PACT_BROKER_TOKEN) as version
                           `git describe --always --dirty` on the current git branch (not in ci)
    status-coverage        fail unless every declared (operation, status) is a pact interaction
                           or a response the test suite received (run after `test`)
    soak [--minutes N] [--instances K [--kill-every S]]
                           mixed traffic with injected faults against a server process for N
                           minutes (default 3); reports lost tasks, 5xx and memory (not in ci);
                           with K >= 2, K instances on a private PostgreSQL, one killed (SIGKILL)
                           and restarted every S seconds (default 60)
    lock                   regenerate requirements.lock in a throwaway venv
    bench [ARGS...]        benchmarks: llorch vs the bare engine (bench/run.py --help); records
                           bench/results/<date>-<sha>.json and regenerates docs/benchmarks.md
    ci                     lint, metrics-lint, spec-extract --check, contract, pact-verify,
                           suites-postgres, test, status-coverage; fails fast
    clean                  remove .venv, var/ and every tool cache

The first command that needs tools creates .venv (python3 -m venv), installs requirements.lock
and then the project itself (pip install --no-deps -e .). It does so again whenever
requirements.lock or pyproject.toml changes (their sha256 are kept in .venv/xtask-stamp).

The tools' logic lives in tools/ (typed, tested under tests/tools/): the commands that need it
run `.venv/bin/python -m tools.MODULE`.

Standard library only: this file runs before any dependency is installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from xml.etree import ElementTree

# The coverage floor for `xtask.py test`. It only goes up.
COVERAGE_FLOOR = 92

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_BIN = VENV / "bin"
VENV_PY = VENV_BIN / "python"
STAMP = VENV / "xtask-stamp"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
# Written by the test suite's status recorder (tests/plugins), read by status-coverage.
STATUS_RECORD = ROOT / "var" / "status-coverage" / "recorded.json"

# What `clean` removes (relative to the repository root).
CLEAN_DIRS = (
    ".venv",
    "var",
    ".hypothesis",
    ".schemathesis",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".import_linter_cache",
)
CLEAN_GLOBS = (".coverage", ".coverage.*")


class TaskError(Exception):
    """A failure that ends the command with a message and exit status 1."""


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def note(message: str) -> None:
    print(f"xtask: {message}", file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str | Path],
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> int:
    """Run a command from the repository root without stdin; return its exit status.

    `quiet` keeps the command's output unless it fails (pip's chatter, which on these
    machines includes a warning per package about the pip configuration's extra indexes).
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


# ------------------------------------------------------------------------------------------------
# .venv bootstrap
# ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wanted_stamp() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "requirements.lock": _sha256(LOCK),
        "pyproject.toml": _sha256(PYPROJECT),
    }


def _read_stamp() -> dict[str, str]:
    try:
        data = json.loads(STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise TaskError(f"pyproject.toml: cannot read the requirement {requirement!r}")
    return _canonical(match.group(1))


def _check_lock_covers_pyproject() -> None:
    """Every dependency of pyproject.toml (runtime and [dev]) must be pinned in the lock."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8")).get("project", {})
    wanted = [
        *project.get("dependencies", []),
        *project.get("optional-dependencies", {}).get("dev", []),
    ]
    pinned = {
        _canonical(line.split("==", 1)[0])
        for line in LOCK.read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    }
    missing = sorted({_requirement_name(req) for req in wanted} - pinned)
    if missing:
        raise TaskError(
            f"requirements.lock does not pin {', '.join(missing)}, which pyproject.toml needs: "
            "run `python3 xtask.py lock`"
        )


def ensure_venv() -> None:
    """Create or refresh .venv so that it matches requirements.lock and pyproject.toml."""
    if not LOCK.is_file():
        raise TaskError("requirements.lock is missing: run `python3 xtask.py lock`")
    wanted = _wanted_stamp()
    have = _read_stamp()
    if have == wanted and VENV_PY.exists():
        return
    _check_lock_covers_pyproject()
    fresh = (
        not VENV_PY.exists()
        or have.get("python") != wanted["python"]
        or have.get("requirements.lock") != wanted["requirements.lock"]
    )
    if fresh:
        # A changed lock rebuilds from scratch: removed pins must not linger in the venv.
        if VENV.exists():
            step("removing outdated .venv")
            shutil.rmtree(VENV)
        step(f"creating .venv ({sys.executable} -m venv)")
        run([sys.executable, "-m", "venv", VENV], quiet=True)
        step("installing requirements.lock into .venv")
        run(
            [VENV_PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", LOCK],
            quiet=True,
        )
    step("installing llorch into .venv (pip install --no-deps -e .)")
    run(
        [
            VENV_PY,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "-e",
            ".",
        ],
        quiet=True,
    )
    step("pip check")
    if run([VENV_PY, "-m", "pip", "check", "--disable-pip-version-check"], check=False, quiet=True):
        raise TaskError(
            "requirements.lock does not satisfy pyproject.toml: run `python3 xtask.py lock`"
        )
    STAMP.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def tool(name: str) -> Path:
    return VENV_BIN / name


# ------------------------------------------------------------------------------------------------
# serve / lint / fmt / test
# ------------------------------------------------------------------------------------------------


def cmd_serve(args: list[str]) -> int:
    ensure_venv()
    argv = [str(VENV_PY), "-m", "llorch", "serve", *args]
    step(" ".join(["python -m llorch serve", *args]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(ROOT)
    # Replace this process, so that Ctrl-C and SIGTERM reach the server directly.
    os.execv(argv[0], argv)


def cmd_lint(args: list[str]) -> int:
    _no_args("lint", args)
    ensure_venv()
    checks: list[tuple[str, list[str | Path]]] = [
        ("ruff check", [tool("ruff"), "check", "."]),
        ("ruff format --check", [tool("ruff"), "format", "--check", "."]),
        ("mypy (strict: src, tests, bench, tools)", [tool("mypy")]),
        ("lint-imports", [tool("lint-imports"), "--no-logo"]),
    ]
    failed = []
    for name, cmd in checks:
        step(name)
        if run(cmd, check=False) != 0:
            failed.append(name)
    if failed:
        note(f"lint failed: {', '.join(failed)}")
        return 1
    return 0


def cmd_fmt(args: list[str]) -> int:
    _no_args("fmt", args)
    ensure_venv()
    # Fixes first (import sorting, upgrades), then the formatter lays out what they changed.
    step("ruff check --fix")
    fix_rc = run([tool("ruff"), "check", "--fix", "."], check=False)
    step("ruff format")
    fmt_rc = run([tool("ruff"), "format", "."], check=False)
    return 1 if fix_rc or fmt_rc else 0


# ------------------------------------------------------------------------------------------------
# The tools of tools/, run inside .venv
# ------------------------------------------------------------------------------------------------


def in_venv(module: str, *args: str) -> int:
    """``.venv/bin/python -m tools.MODULE ARGS``: the tool's exit status is the command's."""
    ensure_venv()
    return run([VENV_PY, "-m", f"tools.{module}", *args], check=False)


def cmd_metrics_lint(args: list[str]) -> int:
    _no_args("metrics-lint", args)
    return in_venv("metrics_lint")


def cmd_spec_extract(args: list[str]) -> int:
    if args not in ([], ["--check"]):
        raise UsageError("spec-extract takes no argument but --check")
    return in_venv("spec_extract", *args)


def cmd_contract(args: list[str]) -> int:
    _no_args("contract", args)
    return in_venv("contract")


def cmd_pact_verify(args: list[str]) -> int:
    _no_args("pact-verify", args)
    return in_venv("pact", "pact-verify")


def cmd_suites_postgres(args: list[str]) -> int:
    _no_args("suites-postgres", args)
    return in_venv("postgres")


def cmd_pact_publish(args: list[str]) -> int:
    _no_args("pact-publish", args)
    return in_venv("pact", "pact-publish")


def cmd_status_coverage(args: list[str]) -> int:
    _no_args("status-coverage", args)
    return in_venv("status_coverage")


def cmd_soak(args: list[str]) -> int:
    return in_venv("soak", *args)  # tools/soak.py checks the options


def cmd_bench(args: list[str]) -> int:
    """The benchmarks live in bench/run.py (which installs wrk when missing); see its --help."""
    ensure_venv()
    return run([VENV_PY, "-m", "bench.run", *args], check=False)


# Filled by cmd_test from pytest's JUnit report: (passed, failed, skipped).
_TEST_COUNTS: list[tuple[int, int, int]] = []


def _junit_counts(report: Path) -> tuple[int, int, int] | None:
    try:
        root = ElementTree.parse(report).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def _junit_failure_tails(report: Path, lines: int = 30, most: int = 3) -> list[str]:
    """The first ``lines`` lines of the first ``most`` failures' texts (their root cause, which
    pytest prints first, far above the coverage table a CI log's tail shows)."""
    try:
        root = ElementTree.parse(report).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    tails = []
    for case in root.iter("testcase"):
        for bad in [*case.iter("failure"), *case.iter("error")][:1]:
            text = (bad.text or bad.get("message") or "").splitlines()
            name = f"{case.get('classname')}::{case.get('name')}"
            tails.append("\n".join([f"--- {name}", *text[:lines]]))
    return tails[:most]


def cmd_test(args: list[str]) -> int:
    ensure_venv()
    with tempfile.TemporaryDirectory(prefix="llorch-test-") as tmp:
        report = Path(tmp) / "junit.xml"
        cmd: list[str | Path] = [
            VENV_PY,
            "-m",
            "pytest",
            "--cov=llorch",
            "--cov-branch",
            "--cov-report=term-missing:skip-covered",
            f"--cov-fail-under={COVERAGE_FLOOR}",
            f"--junitxml={report}",
            *args,
        ]
        # The status recorder (tests/plugins) adds up runs; a full run starts afresh.
        STATUS_RECORD.unlink(missing_ok=True)
        step(f"pytest (coverage floor {COVERAGE_FLOOR}%)")
        rc = run(cmd, check=False)
        counts = _junit_counts(report)
        if rc != 0:
            for tail in _junit_failure_tails(report):
                note(f"the start of a failure's report:\n{tail}")
    if counts is not None:
        _TEST_COUNTS.append(counts)
    if rc == 5:
        note("pytest collected no tests (exit 5): a run that tests nothing fails")
        return 1
    if counts is not None and counts[0] + counts[1] == 0:
        note("pytest ran no test (all deselected or skipped): a run that tests nothing fails")
        return rc or 1
    return rc


# ------------------------------------------------------------------------------------------------
# lock
# ------------------------------------------------------------------------------------------------

LOCK_HEADER = """\
# requirements.lock: the exact llorch dev environment (runtime dependencies + the [dev] extra).
# Generated by `python3 xtask.py lock` (a throwaway venv, pip install -e '.[dev]', pip freeze);
# do not edit by hand. Regenerate after changing dependencies in pyproject.toml.
# Python {python}.
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cmd_lock(args: list[str]) -> int:
    _no_args("lock", args)
    with tempfile.TemporaryDirectory(prefix="llorch-lock-") as tmp:
        venv = Path(tmp) / "venv"
        python = venv / "bin" / "python"
        step(f"creating a throwaway venv in {venv}")
        run([sys.executable, "-m", "venv", venv], quiet=True)
        step("installing .[dev] into it")
        run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-e",
                ".[dev]",
            ],
            quiet=True,
        )
        step("pip freeze --exclude-editable")
        out = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "freeze",
                "--exclude-editable",
                "--disable-pip-version-check",
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise TaskError("pip freeze failed")
    pins = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "==" not in line:
            raise TaskError(f"pip freeze gave a line that is not an exact pin: {line!r}")
        if _canonical(line.split("==", 1)[0]) == "llorch":
            continue
        pins.append(line)
    pins.sort(key=lambda pin: _canonical(pin.split("==", 1)[0]))
    LOCK.write_text(
        LOCK_HEADER.format(python=sys.version.split()[0]) + "\n".join(pins) + "\n",
        encoding="utf-8",
    )
    step(f"wrote {LOCK.name} ({len(pins)} pins)")
    return 0


# ------------------------------------------------------------------------------------------------
# ci / clean / main
# ------------------------------------------------------------------------------------------------


def _bootstrap() -> int:
    ensure_venv()
    return 0


def cmd_ci(args: list[str]) -> int:
    _no_args("ci", args)
    started = time.monotonic()
    steps: list[tuple[str, Callable[[], int]]] = [
        ("bootstrap", _bootstrap),
        ("lint", lambda: cmd_lint([])),
        # Before test: it installs promtool/prometheus, which tests/e2e/test_prometheus.py runs.
        ("metrics-lint", lambda: cmd_metrics_lint([])),
        ("spec-extract --check", lambda: cmd_spec_extract(["--check"])),
        # schemathesis closes its report with a pytest-style "=== 1 warning in 28 s ===" line, which
        # a reader of the log takes for a run that tested nothing: pytest runs after it, so the last
        # runner summary in the log is pytest's own, followed by the plain count printed below.
        ("contract", lambda: cmd_contract([])),
        ("pact-verify", lambda: cmd_pact_verify([])),
        ("suites-postgres", lambda: cmd_suites_postgres([])),
        ("test", lambda: cmd_test([])),
        # After test, which records the statuses the suite received; it prints no pytest line.
        ("status-coverage", lambda: cmd_status_coverage([])),
    ]
    for name, action in steps:
        step(f"xtask ci: {name}")
        step_started = time.monotonic()
        try:
            rc = action()
        except TaskError as exc:
            note(str(exc))
            rc = 1
        elapsed = time.monotonic() - step_started
        if rc != 0:
            print(
                f"xtask ci: FAILED at {name} (exit {rc}) after {time.monotonic() - started:.1f} s",
                flush=True,
            )
            return rc
        print(f"xtask ci: {name} passed in {elapsed:.1f} s", flush=True)
    print(f"xtask ci: OK, all steps passed in {time.monotonic() - started:.1f} s", flush=True)
    if _TEST_COUNTS:
        passed, failed, skipped = _TEST_COUNTS[-1]
        print(f"pytest: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 0


def cmd_clean(args: list[str]) -> int:
    _no_args("clean", args)
    for name in CLEAN_DIRS:
        path = ROOT / name
        if path.is_dir() and not path.is_symlink():
            step(f"removing {name}/")
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            step(f"removing {name}")
            path.unlink()
    for pattern in CLEAN_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            step(f"removing {path.name}")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return 0


class UsageError(Exception):
    """Bad command line: print usage, exit 2."""


def _no_args(command: str, args: list[str]) -> None:
    if args:
        raise UsageError(f"{command} takes no arguments (got {' '.join(args)})")


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "serve": cmd_serve,
    "lint": cmd_lint,
    "fmt": cmd_fmt,
    "metrics-lint": cmd_metrics_lint,
    "test": cmd_test,
    "spec-extract": cmd_spec_extract,
    "contract": cmd_contract,
    "pact-verify": cmd_pact_verify,
    "suites-postgres": cmd_suites_postgres,
    "pact-publish": cmd_pact_publish,
    "status-coverage": cmd_status_coverage,
    "soak": cmd_soak,
    "lock": cmd_lock,
    "bench": cmd_bench,
    "ci": cmd_ci,
    "clean": cmd_clean,
}


def _iter_usage() -> Iterator[str]:
    doc = __doc__ or ""
    yield from doc.strip().splitlines()


def main(argv: list[str]) -> int:
    # Keep our lines in order with the tools' output when stdout is a pipe (CI).
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("\n".join(_iter_usage()))
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    handler = COMMANDS.get(command)
    try:
        if handler is None:
            raise UsageError(f"unknown command {command!r}")
        return handler(args)
    except UsageError as exc:
        note(str(exc))
        note(f"commands: {', '.join(COMMANDS)} (python3 xtask.py --help)")
        return 2
    except TaskError as exc:
        note(f"{command}: {exc}")
        return 1
    except KeyboardInterrupt:
        note("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
