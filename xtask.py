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
    pact-verify            verify contracts/pacts/*.json against the real server (test profile,
                           mock engine, provider states through tests/configs/pact.yaml); with
                           PACT_BROKER_BASE_URL set, also verify the broker's pacts for llorch
                           and publish the results (version: git describe, and the git branch)
    pact-publish           publish contracts/pacts/*.json to the Pact Broker at
                           PACT_BROKER_BASE_URL (bearer token PACT_BROKER_TOKEN) as version
                           `git describe --always --dirty` on the current git branch (not in ci)
    status-coverage        fail unless every declared (operation, status) is a pact interaction
                           or a response the test suite received (run after `test`)
    soak [--minutes N]     mixed traffic with injected faults against a server process for N
                           minutes (default 3); reports lost tasks, 5xx and memory (not in ci)
    lock                   regenerate requirements.lock in a throwaway venv
    bench [ARGS...]        benchmarks: llorch vs the bare engine (bench/run.py --help); records
                           bench/results/<date>-<sha>.json and regenerates docs/benchmarks.md
    ci                     lint, metrics-lint, spec-extract --check, contract, pact-verify, test,
                           status-coverage; fails fast
    clean                  remove .venv, var/ and every tool cache

The first command that needs tools creates .venv (python3 -m venv), installs requirements.lock
and then the project itself (pip install --no-deps -e .). It does so again whenever
requirements.lock or pyproject.toml changes (their sha256 are kept in .venv/xtask-stamp).

Standard library only: this file runs before any dependency is installed.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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

SPECS_DIR = ROOT / ".specs"
REQUIREMENTS_DIR = ROOT / "requirements"
TESTS_DIR = ROOT / "tests"

CONTRACT_SPECS = ("contracts/openapi/data.yaml", "contracts/openapi/control.yaml")
CONTRACT_CONFIG = "tests/configs/contract.yaml"
CONTRACT_READY_PATH = "/readyz"  # public: the contract server runs with authentication on
CONTRACT_READY_TIMEOUT_S = 30.0
CONTRACT_STOP_TIMEOUT_S = 15.0

METRICS_CONTRACT = ROOT / "contracts" / "metrics.yaml"
DASHBOARDS_DIR = ROOT / "ci" / "dashboards"
ALERT_RULES = ROOT / "ci" / "alerts" / "llorch.yaml"
ALERT_TESTS = ROOT / "ci" / "alerts" / "llorch_test.yaml"

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
        ("mypy (strict: src, tests, bench)", [tool("mypy")]),
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
# metrics-lint: dashboards and alert rules against the metrics contract, then promtool
# ------------------------------------------------------------------------------------------------

# PromQL words that are neither metric nor label names.
_PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}
)
_PROMQL_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
# Aggregations may put their by/without clause before the parentheses: `sum by (x) (...)`.
_PROMQL_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk"}
    | {"topk", "quantile", "limitk", "limit_ratio"}
)
_PROMQL_TOKEN_RE = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)"""
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)[smhdwy]*)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},])"
    r"|(?P<space>\s+)"
)
# Grafana variables, replaced before parsing: ranges by a duration, the rest by a regex.
_GRAFANA_VAR_RE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
_LEGEND_LABEL_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class PromqlNames:
    """The metric names of an expression and the label names it uses, and where."""

    # (metric, labels matched in its selector)
    selectors: list[tuple[str, list[str]]] = field(default_factory=list)
    # label names of by/without/on/ignoring/group_left/group_right clauses
    grouping: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _substitute_grafana_vars(expr: str) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        return "5m" if name in ("__rate_interval", "__interval", "__range") else ".*"

    return _GRAFANA_VAR_RE.sub(repl, expr)


def promql_names(expr: str) -> PromqlNames:
    """Find the metric and label names of a PromQL expression with a small tokenizer.

    Identifiers followed by `(` (or aggregations followed by by/without) are functions or
    aggregations; identifiers inside `{...}`
    followed by a matcher are labels; identifiers in the parentheses after by/on/... are labels;
    the remaining identifiers (but PromQL keywords) are metric names.
    """
    out = PromqlNames()
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = _substitute_grafana_vars(expr)
    while pos < len(text):
        match = _PROMQL_TOKEN_RE.match(text, pos)
        if match is None:
            out.errors.append(f"cannot read the expression at {text[pos : pos + 20]!r}")
            return out
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
    i = 0
    brace_metric: tuple[str, list[str]] | None = None
    in_braces = False
    grouping = False
    while i < len(tokens):
        kind, value = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if value == "{":
            in_braces = True
            prev = tokens[i - 1] if i else ("", "")
            if prev[0] == "ident" and prev[1] not in _PROMQL_GROUPING:
                brace_metric = out.selectors[-1] if out.selectors else None
            else:
                brace_metric = ("", [])  # a selector without a metric name
                out.selectors.append(brace_metric)
        elif value == "}":
            in_braces = False
            brace_metric = None
        elif grouping and value == ")":
            grouping = False
        elif kind == "ident":
            if in_braces:
                if nxt in ("=", "!=", "=~", "!~") and brace_metric is not None:
                    if value == "__name__":
                        out.errors.append("match metrics by name, not by __name__")
                    brace_metric[1].append(value)
            elif grouping:
                out.grouping.append(value)
            elif value in _PROMQL_GROUPING and nxt == "(":
                grouping = True
                i += 1
            elif (
                nxt == "("
                or value.lower() in _PROMQL_KEYWORDS
                or (value in _PROMQL_AGGREGATIONS and nxt in ("by", "without"))
            ):
                pass
            else:
                out.selectors.append((value, []))
        i += 1
    return out


def _contract_series(contract: dict[str, object]) -> dict[str, tuple[str, set[str]]]:
    """Exposed series name -> (contract metric name, its labels), `le` for histogram series."""
    series: dict[str, tuple[str, set[str]]] = {}
    metrics = contract.get("metrics")
    if not isinstance(metrics, list):
        raise TaskError(f"{_rel(METRICS_CONTRACT)}: no `metrics` list")
    for spec in metrics:
        name, kind, labels = spec["name"], spec["type"], set(spec["labels"])
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                extra = {"le"} if suffix == "_bucket" else set()
                series[name + suffix] = (name, labels | extra)
        else:
            series[name] = (name, labels)
    return series


def check_expr(
    expr: str, series: dict[str, tuple[str, set[str]]], where: str, legend: str = ""
) -> list[str]:
    """Problems of one expression: metric names and labels the contract does not define."""
    names = promql_names(expr)
    errors = [f"{where}: {e}" for e in names.errors]
    known_labels: set[str] = set()
    metrics_found = False
    for metric, labels in names.selectors:
        if not metric:
            errors.append(f"{where}: a selector without a metric name")
            continue
        metrics_found = True
        if metric not in series:
            hint = ""
            if metric + "_total" in series:
                hint = f" (counters are exposed as {metric}_total)"
            errors.append(f"{where}: metric {metric} is not in the contract{hint}")
            continue
        contract_labels = series[metric][1]
        known_labels |= contract_labels
        for label in labels:
            if label not in contract_labels:
                errors.append(f"{where}: {metric} has no label {label!r} in the contract")
    if not metrics_found:
        errors.append(f"{where}: uses no contract metric")
    if names.errors:
        return errors
    for label in names.grouping:
        if label not in known_labels:
            errors.append(f"{where}: label {label!r} is not a label of the expression's metrics")
    for label in _LEGEND_LABEL_RE.findall(legend):
        if label not in known_labels:
            errors.append(f"{where}: the legend names {label!r}, not a label of its metrics")
    return errors


def _venv_yaml_to_json(path: Path) -> object:
    """Parse YAML with the venv's PyYAML (this file is stdlib-only)."""
    proc = subprocess.run(
        [
            str(VENV_PY),
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            str(path),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise TaskError(f"cannot parse {_rel(path)}:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _dashboard_targets(dashboard: dict[str, object]) -> Iterator[tuple[str, dict[str, object]]]:
    """(panel title, target) of every panel, rows' collapsed panels included."""
    panels = list(dashboard.get("panels") or [])  # type: ignore[call-overload]
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels") or [])
        for target in panel.get("targets") or []:
            yield str(panel.get("title", "?")), target


def lint_dashboards(series: dict[str, tuple[str, set[str]]]) -> tuple[list[str], int]:
    errors: list[str] = []
    count = 0
    paths = sorted(DASHBOARDS_DIR.glob("*.json"))
    if not paths:
        errors.append(f"{_rel(DASHBOARDS_DIR)}: no dashboard")
    for path in paths:
        where = _rel(path)
        try:
            dashboard = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            errors.append(f"{where}: not JSON: {exc}")
            continue
        if dashboard.get("schemaVersion") != 39:
            errors.append(f"{where}: schemaVersion must be 39")
        variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
        pool_var = variables.get("pool_id", {})
        query = pool_var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if query != "label_values(llorch_queue_depth, pool_id)":
            errors.append(f"{where}: needs a pool_id variable over llorch_queue_depth")
        for title, target in _dashboard_targets(dashboard):
            expr = str(target.get("expr", ""))
            target_where = f"{where}: panel {title!r} {target.get('refId', '?')}"
            if not expr.strip():
                errors.append(f"{target_where}: no expr")
                continue
            count += 1
            errors += check_expr(expr, series, target_where, str(target.get("legendFormat", "")))
            names = promql_names(expr)
            for metric, labels in names.selectors:
                if "pool_id" in series.get(metric, ("", set()))[1] and "pool_id" not in labels:
                    errors.append(f"{target_where}: {metric} is not filtered by $pool_id")
    return errors, count


def lint_alerts(series: dict[str, tuple[str, set[str]]]) -> tuple[list[str], int]:
    errors: list[str] = []
    where = _rel(ALERT_RULES)
    rules_doc = _venv_yaml_to_json(ALERT_RULES)
    alerts: list[str] = []
    groups = rules_doc.get("groups") if isinstance(rules_doc, dict) else None
    for group in groups or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record") or "?"
            rule_where = f"{where}: {name}"
            errors += check_expr(str(rule.get("expr", "")), series, rule_where)
            if "alert" not in rule:
                continue
            alerts.append(name)
            if not rule.get("for"):
                errors.append(f"{rule_where}: no `for`")
            if not (rule.get("labels") or {}).get("severity"):
                errors.append(f"{rule_where}: no severity label")
            annotations = rule.get("annotations") or {}
            for key in ("summary", "description"):
                if not annotations.get(key):
                    errors.append(f"{rule_where}: no {key} annotation")
    if not alerts:
        errors.append(f"{where}: no alert")
    # Every alert is unit-tested both firing and not firing.
    tests_doc = _venv_yaml_to_json(ALERT_TESTS)
    firing: set[str] = set()
    quiet: set[str] = set()
    tests = tests_doc.get("tests") if isinstance(tests_doc, dict) else None
    for test in tests or []:
        for case in test.get("alert_rule_test") or []:
            (firing if case.get("exp_alerts") else quiet).add(case.get("alertname"))
    for name in alerts:
        for seen, what in ((firing, "firing"), (quiet, "not firing")):
            if name not in seen:
                errors.append(f"{_rel(ALERT_TESTS)}: no test of {name} {what}")
    return errors, len(alerts)


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` when it is not on PATH."""
    found = shutil.which(command)
    if found:
        return found
    step(f"{command} is not on PATH: apt-get install -y {package}")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo") and run(["sudo", "-n", "true"], check=False, quiet=True) == 0:
        prefix = ["sudo", "-n"]
    else:
        raise TaskError(
            f"{command} is not on PATH and installing it needs root: run "
            f"`apt-get update && apt-get install -y {package}` as root (or put {command} on PATH)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run([*prefix, "apt-get", "update"], env=env, quiet=True)
        run([*prefix, "apt-get", "install", "-y", "--no-install-recommends", package], env=env)
    except TaskError as exc:
        raise TaskError(f"could not install {command} with apt-get: {exc}") from exc
    found = shutil.which(command)
    if not found:
        raise TaskError(f"apt-get installed {package} but {command} is still not on PATH")
    return found


def ensure_promtool() -> str:
    return ensure_debian_tool("promtool", "prometheus")


def cmd_metrics_lint(args: list[str]) -> int:
    _no_args("metrics-lint", args)
    ensure_venv()
    step("metrics-lint: dashboards and alert rules against contracts/metrics.yaml")
    contract = _venv_yaml_to_json(METRICS_CONTRACT)
    if not isinstance(contract, dict):
        raise TaskError(f"{_rel(METRICS_CONTRACT)}: not a mapping")
    series = _contract_series(contract)
    dash_errors, exprs = lint_dashboards(series)
    alert_errors, alerts = lint_alerts(series)
    errors = dash_errors + alert_errors
    if errors:
        print("\n".join(f"  {e}" for e in errors))
        note(f"metrics-lint found {len(errors)} problem(s)")
        return 1
    print(f"{exprs} dashboard expressions and {alerts} alerts use contract metrics and labels only")
    promtool = ensure_promtool()
    step(f"promtool check rules {_rel(ALERT_RULES)}")
    run([promtool, "check", "rules", ALERT_RULES])
    step(f"promtool test rules {_rel(ALERT_TESTS)}")
    run([promtool, "test", "rules", ALERT_TESTS])
    return 0


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
# contract: schemathesis against a live server
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The server is on the loopback interface: never go through a proxy from the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TaskError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with _NO_PROXY_OPENER.open(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(getattr(exc, "reason", exc))
        time.sleep(0.2)
    raise TaskError(f"the server was not ready within {timeout_s:.0f} s ({url}: {last_error})")


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    # The server runs in its own process group (start_new_session): signal it and any child.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=CONTRACT_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            note(f"the server ignored SIGTERM for {CONTRACT_STOP_TIMEOUT_S:.0f} s: killing it")
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            return
    # Anything the server started and left behind in its group goes too.
    _signal_group(proc, signal.SIGKILL)


def _print_log_tail(log_path: Path, lines: int = 60) -> None:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    tail = text.splitlines()[-lines:]
    print(f"---- last {len(tail)} lines of the server log ({log_path.name}) ----")
    print("\n".join(tail))
    print("---- end of server log ----", flush=True)


def _start_server(
    *, port: int, config: str | Path, data_dir: Path, log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``python -m llorch serve`` on 127.0.0.1:``port`` in the test profile, in its own process
    group (``_stop`` ends it and anything it started), its output in ``log_path``."""
    cmd = [str(VENV_PY), "-m", "llorch", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--config", str(config), "--profile", "test", "--data-dir", str(data_dir)]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def cmd_contract(args: list[str]) -> int:
    _no_args("contract", args)
    ensure_venv()
    for relative in (*CONTRACT_SPECS, CONTRACT_CONFIG):
        if not (ROOT / relative).is_file():
            raise TaskError(f"{relative} is missing")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="llorch-contract-"))
    log_path = data_dir / "server.log"
    # Authentication is on (tests/configs/contract.yaml): a fresh key for this run, given to the
    # server in its environment and to schemathesis as a header. Its `ignored_auth` check then
    # proves that each protected operation refuses the same request without it.
    contract_key = secrets.token_urlsafe(24)
    server_env = dict(os.environ, LLORCH_CONTRACT_KEY=contract_key)
    # Schemathesis uses requests, which honours *_PROXY: keep loopback traffic direct.
    st_env = dict(os.environ)
    for key in ("NO_PROXY", "no_proxy"):
        st_env[key] = ",".join(filter(None, [st_env.get(key, ""), "127.0.0.1", "localhost"]))
    step(f"starting the server on {base_url} (data dir {data_dir})")
    failed = True
    try:
        proc = _start_server(
            port=port,
            config=CONTRACT_CONFIG,
            data_dir=data_dir,
            log_path=log_path,
            env=server_env,
        )
        try:
            _wait_ready(proc, base_url + CONTRACT_READY_PATH, CONTRACT_READY_TIMEOUT_S)
            step("the server is ready")
            failed = False
            # Both planes together, so the stateful phase can follow links across them.
            both = data_dir / "both-planes.json"
            run(
                [
                    VENV_PY,
                    "-c",
                    "import json, sys; from llorch.contracts import merged_openapi; "
                    "json.dump(merged_openapi(), open(sys.argv[1], 'w'))",
                    both,
                ]
            )
            for spec in (*CONTRACT_SPECS, str(both)):
                step(f"schemathesis: st run {spec}")
                # The spec's paths start with /v1 already, so the URL has no base path.
                st_cmd: list[str | Path] = [
                    tool("st"),
                    "run",
                    spec,
                    "--url",
                    base_url,
                    "--checks",
                    "all",
                    "--header",
                    f"Authorization: Bearer {contract_key}",
                    "--max-examples",
                    "60",
                    "--request-timeout",
                    "10",
                    "--no-color",
                ]
                rc = run(st_cmd, check=False, env=st_env)
                if rc != 0:
                    note(f"schemathesis failed on {spec} (exit {rc})")
                    failed = True
                    break
        finally:
            step("stopping the server")
            _stop(proc)
            if failed:
                _print_log_tail(log_path)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 1 if failed else 0


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
# spec-extract
# ------------------------------------------------------------------------------------------------

ID_RE = r"[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*-[0-9]{4}"
# U+2010..U+2015 (hyphen .. horizontal bar), U+2212 (minus), U+00AD (soft hyphen),
# U+FE63 (small hyphen-minus), U+FF0D (fullwidth hyphen-minus).
BAD_HYPHENS = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u00ad\ufe63\uff0d"
_ANY_HYPHEN = "[-" + BAD_HYPHENS + "]"
ID_LIKE_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Z][A-Z0-9]*(?:"
    + _ANY_HYPHEN
    + r"[A-Z0-9]+)*"
    + _ANY_HYPHEN
    + r"[0-9]{4}(?![0-9])"
)
# A list item whose text starts with a bracketed ID that is not a link ("[X-0001](...)").
REQ_LINE_RE = re.compile(
    r"^(?P<indent>\s*)[-*+]\s+\[(?P<id>" + ID_RE + r")\](?![(\[])(?P<text>.*)$"
)
# Looks like a requirement but the ID is malformed (lowercase, not four digits, ...).
NEAR_REQ_LINE_RE = re.compile(
    r"^\s*[-*+]\s+\[(?P<id>[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*-[0-9]{3,5})\](?![(\[])"
)
ATX_HEADING_RE = re.compile(r"^ {0,3}#{1,6}(?:\s+(?P<text>.*?))?(?:\s+#+)?\s*$")
LIST_ITEM_RE = re.compile(r"^([-*+]|[0-9]+[.)])(\s|$)")
SETEXT_RE = re.compile(r"^ {0,3}(=+|-+)\s*$")
FENCE_RE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})")
KEYWORD_RE = re.compile(r"(?<![A-Za-z0-9_])(MUST|SHALL|SHOULD|MAY)(?![A-Za-z0-9_])")
LEVELS = {"MUST": "MUST", "SHALL": "MUST", "SHOULD": "SHOULD", "MAY": "MAY"}
LEVEL_ORDER = ("MUST", "SHOULD", "MAY")


@dataclass
class Requirement:
    id: str
    title: str
    level: str
    section: str
    spec: str  # path relative to the repository root, e.g. ".specs/data-plane.md"
    line: int
    tests: set[str] = field(default_factory=set)

    @property
    def source(self) -> str:
        return f"{self.spec}:{self.line}"


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parse_spec(path: Path, errors: list[str]) -> list[Requirement]:
    """Return the requirements of one spec file; append problems to `errors`."""
    spec = _rel(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        errors.append(f"{spec}: not valid UTF-8 ({exc})")
        return []

    for number, line in enumerate(lines, start=1):
        for match in ID_LIKE_RE.finditer(line):
            token = match.group(0)
            bad = sorted({f"U+{ord(ch):04X}" for ch in token if ch in BAD_HYPHENS})
            if bad:
                clean = "".join("-" if ch in BAD_HYPHENS else ch for ch in token)
                errors.append(
                    f"{spec}:{number}: {clean!r} is written with a non-ASCII hyphen "
                    f"({', '.join(bad)}); use '-' (U+002D)"
                )

    requirements: list[Requirement] = []
    section = ""
    fence: str | None = None
    previous_text_line = False  # for setext headings
    index = 0
    while index < len(lines):
        line = lines[index]
        number = index + 1
        index += 1
        fence_match = FENCE_RE.match(line)
        if fence is not None:
            if (
                fence_match
                and fence_match.group("fence")[0] == fence[0]
                and len(fence_match.group("fence")) >= len(fence)
            ):
                fence = None
            continue
        if fence_match:
            fence = fence_match.group("fence")
            previous_text_line = False
            continue
        heading = ATX_HEADING_RE.match(line)
        if heading:
            section = " ".join((heading.group("text") or "").split())
            previous_text_line = False
            continue
        if previous_text_line and SETEXT_RE.match(line):
            section = " ".join(lines[index - 2].split())
            previous_text_line = False
            continue
        req = REQ_LINE_RE.match(line)
        if req is None:
            near = NEAR_REQ_LINE_RE.match(line)
            if near:
                errors.append(
                    f"{spec}:{number}: malformed requirement ID [{near.group('id')}] "
                    f"(expected the pattern {ID_RE})"
                )
            # A setext underline makes a heading only of an unindented paragraph line.
            previous_text_line = bool(line.strip()) and not line[0].isspace()
            previous_text_line = previous_text_line and not LIST_ITEM_RE.match(line)
            continue
        previous_text_line = False
        indent = len(req.group("indent").expandtabs(4))
        parts = [req.group("text")]
        # Continuation lines: non-blank, indented deeper than the bullet, not a new requirement.
        while index < len(lines):
            follow = lines[index]
            if not follow.strip() or REQ_LINE_RE.match(follow) or FENCE_RE.match(follow):
                break
            follow = follow.expandtabs(4)
            if len(follow) - len(follow.lstrip()) <= indent:
                break
            parts.append(follow)
            index += 1
        title = " ".join(" ".join(parts).split())
        keyword = KEYWORD_RE.search(title)
        if keyword is None:
            errors.append(
                f"{spec}:{number}: requirement {req.group('id')} has no RFC-2119 keyword "
                "(MUST, MUST NOT, SHALL, SHOULD, SHOULD NOT or MAY, in capitals)"
            )
            continue
        requirements.append(
            Requirement(
                id=req.group("id"),
                title=title,
                level=LEVELS[keyword.group(1)],
                section=section,
                spec=spec,
                line=number,
            )
        )
    return requirements


def _mark_req_call(node: ast.expr) -> ast.Call | None:
    """`pytest.mark.req(...)` or `mark.req(...)`, else None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr == "req"):
        return None
    owner = func.value
    if isinstance(owner, ast.Attribute) and owner.attr == "mark":
        return node if isinstance(owner.value, ast.Name) and owner.value.id == "pytest" else None
    if isinstance(owner, ast.Name) and owner.id == "mark":
        return node
    return None


def _req_ids(nodes: Sequence[ast.expr], where: str, errors: list[str]) -> list[tuple[str, int]]:
    """The (ID, line) pairs named by req markers among `nodes`."""
    found: list[tuple[str, int]] = []
    for node in nodes:
        call = _mark_req_call(node)
        if call is None:
            continue
        if call.keywords:
            errors.append(f"{where}:{call.lineno}: pytest.mark.req takes IDs only, no keywords")
        if not call.args:
            errors.append(f"{where}:{call.lineno}: pytest.mark.req names no requirement ID")
        for arg in call.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((arg.value, arg.lineno))
            else:
                errors.append(
                    f"{where}:{arg.lineno}: pytest.mark.req arguments must be string literals "
                    "(spec-extract reads them without running pytest)"
                )
    return found


def _pytestmark(body: Sequence[ast.stmt]) -> list[ast.expr]:
    """The marker expressions assigned to `pytestmark` in a module or class body."""
    marks: list[ast.expr] = []
    for stmt in body:
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign):
            targets = [stmt.target]
        else:
            continue
        value = stmt.value
        if value is None or not any(
            isinstance(target, ast.Name) and target.id == "pytestmark" for target in targets
        ):
            continue
        marks.extend(value.elts if isinstance(value, ast.List | ast.Tuple) else [value])
    return marks


def _collect_tests(
    body: Sequence[ast.stmt],
    prefix: str,
    inherited: list[tuple[str, int]],
    where: str,
    out: dict[str, set[str]],
    errors: list[str],
) -> None:
    """Record which test node IDs prove which requirement IDs, following pytest's collection."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            own = _req_ids(stmt.decorator_list, where, errors)
            if not stmt.name.startswith("test"):
                if own:
                    errors.append(
                        f"{where}:{stmt.lineno}: {stmt.name} carries pytest.mark.req but pytest "
                        "does not collect it as a test (name it test_*)"
                    )
                continue
            for req_id, _line in [*inherited, *own]:
                out.setdefault(req_id, set()).add(f"{prefix}::{stmt.name}")
        elif isinstance(stmt, ast.ClassDef):
            own = _req_ids(stmt.decorator_list, where, errors)
            own += _req_ids(_pytestmark(stmt.body), where, errors)
            if not stmt.name.startswith("Test"):
                if own:
                    errors.append(
                        f"{where}:{stmt.lineno}: class {stmt.name} carries pytest.mark.req but "
                        "pytest does not collect it (name it Test*)"
                    )
                continue
            _collect_tests(
                stmt.body, f"{prefix}::{stmt.name}", [*inherited, *own], where, out, errors
            )


def scan_tests(errors: list[str]) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Map requirement ID -> test node IDs, and ID -> where markers name it (for errors)."""
    proofs: dict[str, set[str]] = {}
    mentions: dict[str, list[str]] = {}
    if not TESTS_DIR.is_dir():
        return proofs, mentions
    for path in sorted(TESTS_DIR.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        where = _rel(path)
        try:
            tree = ast.parse(path.read_bytes(), filename=where)
        except SyntaxError as exc:
            errors.append(f"{where}:{exc.lineno}: cannot parse: {exc.msg}")
            continue
        module_marks = _req_ids(_pytestmark(tree.body), where, errors)
        found: dict[str, set[str]] = {}
        _collect_tests(tree.body, where, module_marks, where, found, errors)
        for req_id, tests in found.items():
            proofs.setdefault(req_id, set()).update(tests)
        # Every marker, collected or not, must name a known ID: remember where each appears.
        for node in ast.walk(tree):
            if isinstance(node, ast.expr) and _mark_req_call(node) is not None:
                for req_id, line in _req_ids([node], where, []):
                    mentions.setdefault(req_id, []).append(f"{where}:{line}")
    return proofs, mentions


_PLAIN_SAFE_RE = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./:\-]*$")
# Characters YAML does not allow raw in a double-quoted scalar, or would fold as line breaks.
_YAML_UNSAFE = {0x7F, 0x85, 0x2028, 0x2029, 0xFEFF}


def yaml_quote(text: str) -> str:
    """A YAML double-quoted scalar, escaped JSON-style."""
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(
        f"\\u{ord(ch):04x}"
        if ord(ch) in _YAML_UNSAFE
        or 0x80 <= ord(ch) <= 0x9F
        or 0xD800 <= ord(ch) <= 0xDFFF
        or ord(ch) in (0xFFFE, 0xFFFF)
        else ch
        for ch in quoted
    )


def yaml_plain_or_quoted(text: str) -> str:
    if _PLAIN_SAFE_RE.match(text) and ": " not in text and not text.endswith(":"):
        return text
    return yaml_quote(text)


def render_requirements(spec: str, requirements: list[Requirement]) -> str:
    out = [f"# Generated by `python3 xtask.py spec-extract` from {spec}. Do not edit."]
    if not requirements:
        out.append("{}")
    for req in sorted(requirements, key=lambda r: r.id):
        out.append(f"{req.id}:")
        out.append(f"  title: {yaml_quote(req.title)}")
        out.append(f"  level: {req.level}")
        out.append(f"  section: {yaml_quote(req.section)}")
        out.append(f"  source: {yaml_plain_or_quoted(req.source)}")
        if req.tests:
            out.append("  tests:")
            out.extend(f"    - {yaml_plain_or_quoted(test)}" for test in sorted(req.tests))
        else:
            out.append("  tests: []")
    return "\n".join(out) + "\n"


def _error_order(error: str) -> tuple[str, int, str]:
    match = re.match(r"^([^:]*)(?::(\d+))?:", error)
    if match is None:
        return ("", 0, error)
    return (match.group(1), int(match.group(2) or 0), error)


def extract() -> tuple[dict[str, str], list[Requirement]]:
    """Build requirements/*.yaml in memory: (file name -> text, all requirements)."""
    errors: list[str] = []
    specs = sorted(SPECS_DIR.glob("*.md")) if SPECS_DIR.is_dir() else []
    if not specs:
        raise TaskError(f"no spec files: {_rel(SPECS_DIR)}/*.md matches nothing")
    by_spec: dict[str, tuple[str, list[Requirement]]] = {}
    by_id: dict[str, Requirement] = {}
    stems: dict[str, str] = {}
    for path in specs:
        name = f"{path.stem}.yaml"
        if name.lower() in stems:
            errors.append(f"{_rel(path)}: its output {name} clashes with {stems[name.lower()]}")
        stems[name.lower()] = _rel(path)
        by_spec[name] = (_rel(path), [])
        for req in parse_spec(path, errors):
            first = by_id.get(req.id)
            if first is not None:
                errors.append(
                    f"{req.source}: duplicate requirement ID {req.id} (first at {first.source})"
                )
                continue
            by_id[req.id] = req
            by_spec[name][1].append(req)
    proofs, mentions = scan_tests(errors)
    for req_id in sorted(mentions):
        if req_id not in by_id:
            for place in mentions[req_id]:
                errors.append(f"{place}: pytest.mark.req names {req_id}, which no spec defines")
    if errors:
        errors.sort(key=_error_order)
        raise TaskError(f"found {len(errors)} problem(s):\n" + "\n".join(f"  {e}" for e in errors))
    for req_id, tests in proofs.items():
        by_id[req_id].tests.update(tests)
    files = {name: render_requirements(spec, reqs) for name, (spec, reqs) in by_spec.items()}
    return files, sorted(by_id.values(), key=lambda r: r.id)


def _existing_outputs() -> dict[str, bytes]:
    if not REQUIREMENTS_DIR.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in sorted(REQUIREMENTS_DIR.glob("*.yaml"))}


def cmd_spec_extract(args: list[str]) -> int:
    if args not in ([], ["--check"]):
        raise UsageError("spec-extract takes no argument but --check")
    check = args == ["--check"]
    step("spec-extract" + (" --check" if check else ""))
    files, requirements = extract()
    existing = _existing_outputs()
    counts = {level: sum(r.level == level for r in requirements) for level in LEVEL_ORDER}
    untested = {
        level: [r for r in requirements if r.level == level and not r.tests]
        for level in LEVEL_ORDER
    }
    print(
        f"{len(requirements)} requirements in {len(files)} spec file(s): "
        + ", ".join(f"{counts[level]} {level}" for level in LEVEL_ORDER)
        + "; without a test: "
        + ", ".join(f"{len(untested[level])} {level}" for level in LEVEL_ORDER)
    )
    if not check:
        REQUIREMENTS_DIR.mkdir(exist_ok=True)
        for name, text in files.items():
            if existing.get(name) != text.encode("utf-8"):
                (REQUIREMENTS_DIR / name).write_bytes(text.encode("utf-8"))
                print(f"  wrote requirements/{name}")
        for name in sorted(set(existing) - set(files)):
            (REQUIREMENTS_DIR / name).unlink()
            print(f"  removed stale requirements/{name}")
        return 0

    ok = True
    stale = [
        f"  requirements/{name}: "
        + ("missing" if name not in existing else "differs" if name in files else "extra")
        for name in sorted(set(files) | set(existing))
        if existing.get(name) != (files[name].encode("utf-8") if name in files else None)
    ]
    if stale:
        ok = False
        print("\n".join(stale))
        note("requirements/ is stale: run python3 xtask.py spec-extract")
    if untested["MUST"]:
        ok = False
        print(f"{len(untested['MUST'])} MUST requirement(s) have no test:")
        for req in untested["MUST"]:
            print(f"  {req.id}  {req.source}  {req.title}")
        note("every MUST requirement needs a test marked @pytest.mark.req(ID)")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# pact-verify / pact-publish / status-coverage: the pact against the real server and the broker;
# every declared status
# ------------------------------------------------------------------------------------------------

PACT_DIR = ROOT / "contracts" / "pacts"
PACT_CONFIG = "tests/configs/pact.yaml"
STATUS_RECORD = ROOT / "var" / "status-coverage" / "recorded.json"


def _git(*args: str) -> str:
    """The stripped output of a git command in the repository ("" when git fails)."""
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def app_version() -> str:
    """This checkout's version for the broker: `git describe --always --dirty`."""
    version = _git("describe", "--always", "--dirty")
    if not version:
        raise TaskError("cannot version the pacts: `git describe --always --dirty` failed")
    return version


def app_branch() -> str:
    """The current git branch; on a detached HEAD (CI checkouts) the CI's branch name."""
    branch = _git("branch", "--show-current")
    branch = branch or os.environ.get("GITHUB_HEAD_REF") or os.environ.get("GITHUB_REF_NAME", "")
    if not branch:
        raise TaskError("cannot tell the git branch (detached HEAD and no GITHUB_REF_NAME)")
    return branch


def _broker_url() -> str | None:
    return os.environ.get("PACT_BROKER_BASE_URL", "").strip() or None


def cmd_pact_verify(args: list[str]) -> int:
    """Boot the real server (test profile, provider-state route on) and verify every pact.

    With PACT_BROKER_BASE_URL set, the pacts the broker holds for llorch are verified as well
    and the results are published with this checkout's version and branch: a broker records
    results only for pacts it served (a local file has nowhere to report to).
    """
    _no_args("pact-verify", args)
    ensure_venv()
    pacts = sorted(PACT_DIR.glob("*.json"))
    if not pacts:
        raise TaskError(f"no pact in {_rel(PACT_DIR)}: run the consumer tests (tests/pact)")
    verify_args: list[str | Path] = [*pacts]
    broker_url = _broker_url()
    if broker_url is not None:
        version, branch = app_version(), app_branch()
        verify_args += ["--broker-url", broker_url, "--version", version, "--branch", branch]
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(prefix="llorch-pact-"))
    log_path = data_dir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    env["PACT_DO_NOT_TRACK"] = "true"
    step(f"starting the server on {base_url} (data dir {data_dir})")
    proc = _start_server(
        port=port, config=PACT_CONFIG, data_dir=data_dir, log_path=log_path, env=env
    )
    try:
        _wait_ready(proc, base_url + "/livez", CONTRACT_READY_TIMEOUT_S)
        step(f"verifying {', '.join(p.name for p in pacts)}")
        if broker_url is not None:
            step(f"and the broker's pacts for llorch ({broker_url}), publishing the results")
        rc = run([VENV_PY, "tests/pact/verify.py", base_url, *verify_args], check=False, env=env)
    finally:
        _stop(proc)
    if rc != 0:
        _print_log_tail(log_path)
    return rc


def cmd_pact_publish(args: list[str]) -> int:
    """Publish contracts/pacts/*.json to the Pact Broker at PACT_BROKER_BASE_URL."""
    _no_args("pact-publish", args)
    broker_url = _broker_url()
    if broker_url is None:
        raise TaskError(
            "PACT_BROKER_BASE_URL is not set: it names the Pact Broker to publish to "
            "(and PACT_BROKER_TOKEN its bearer token)"
        )
    pacts = sorted(PACT_DIR.glob("*.json"))
    if not pacts:
        raise TaskError(f"no pact in {_rel(PACT_DIR)}: run the consumer tests (tests/pact)")
    version, branch = app_version(), app_branch()
    ensure_venv()
    if not tool("pact").is_file():
        raise TaskError(f"{_rel(tool('pact'))} is missing: pact-python-cli provides it")
    step(f"publishing {', '.join(p.name for p in pacts)} to {broker_url} as {version} on {branch}")
    # The pact CLI reads PACT_BROKER_TOKEN (or _USERNAME/_PASSWORD) from its environment: the
    # secret stays off the command line, where `ps` and CI logs would show it.
    cmd: list[str | Path] = [tool("pact"), "broker", "publish", _rel(PACT_DIR)]
    cmd += ["--broker-base-url", broker_url, "--consumer-app-version", version, "--branch", branch]
    return run(cmd, check=False)


def _declared_statuses() -> set[tuple[str, int]]:
    code = (
        "import json, sys; from tests.plugins.status_recorder import declared; "
        "json.dump(sorted(declared()), sys.stdout)"
    )
    proc = subprocess.run(
        [str(VENV_PY), "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise TaskError(f"cannot read the OpenAPI documents:\n{proc.stderr.strip()}")
    return {(op, int(status)) for op, status in json.loads(proc.stdout)}


_PACT_DESCRIPTION_RE = re.compile(r"^(\w+) answered (\d{3}) ")


def _pact_statuses() -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for path in sorted(PACT_DIR.glob("*.json")):
        for interaction in json.loads(path.read_text(encoding="utf-8")).get("interactions", []):
            match = _PACT_DESCRIPTION_RE.match(interaction.get("description", ""))
            status = interaction.get("response", {}).get("status")
            if match is not None and status == int(match.group(2)):
                found.add((match.group(1), status))
    return found


def cmd_status_coverage(args: list[str]) -> int:
    """Every declared (operation, status) is a pact interaction or a response a test received."""
    _no_args("status-coverage", args)
    ensure_venv()
    declared = _declared_statuses()
    in_pact = _pact_statuses()
    recorded: set[tuple[str, int]] = set()
    if STATUS_RECORD.is_file():
        data = json.loads(STATUS_RECORD.read_text(encoding="utf-8"))
        recorded = {(op, int(status)) for op, status in data.get("pairs", [])}
    else:
        note(f"no {_rel(STATUS_RECORD)}: run `python3 xtask.py test` first")
    uncovered = sorted(declared - in_pact - recorded)
    print(
        f"status coverage: {len(declared)} declared (operation, status) pairs; "
        f"{len(declared & in_pact)} in the pact, {len(declared & recorded)} received by tests, "
        f"{len(uncovered)} uncovered"
    )
    for operation, status in uncovered:
        print(f"  uncovered: {operation} {status}")
    return 1 if uncovered else 0


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


# ------------------------------------------------------------------------------------------------
# soak: mixed traffic with injected faults against a real server process (not in ci)
# ------------------------------------------------------------------------------------------------

SOAK_WORKERS = 6
SOAK_DRAIN_TIMEOUT_S = 120.0
# JSON is YAML: the server reads this as its configuration file. Three pools: a healthy one, one
# whose second replica resets mid-stream, one whose second replica hangs (decode timeout).
SOAK_CONFIG: dict[str, object] = {
    "server": {"shutdown_grace_s": 5, "heartbeat_s": 1, "stream_max_lag_events": 512},
    "budgets": {"default": {"tokens": 100000000, "time_ms": 86400000, "cost": 100000}},
    "pools": [
        {
            "id": "steady",
            "model": "mock-small",
            "replicas": 2,
            "slots_per_replica": 4,
            "queue": {"capacity": 64, "policy": "reject"},
            "mock": {"ttft_ms": 5, "tokens_per_s": 400},
        },
        {
            "id": "flaky",
            "model": "mock-flaky",
            "replicas": 2,
            "slots_per_replica": 2,
            "queue": {"capacity": 32, "policy": "drop-lru"},
            "mock": {
                "ttft_ms": 5,
                "tokens_per_s": 400,
                "failure": {"mode": "mid_stream", "after_tokens": 3, "replicas": [1]},
            },
        },
        {
            "id": "stuck",
            "model": "mock-stuck",
            "replicas": 2,
            "slots_per_replica": 2,
            "decode_timeout_ms": 300,
            "queue": {"capacity": 32, "policy": "reject"},
            "mock": {
                "ttft_ms": 5,
                "tokens_per_s": 400,
                "failure": {"mode": "hang", "after_tokens": 2, "replicas": [1]},
            },
        },
    ],
    "auth": {
        "keys": [
            {"name": "soak", "key_env": "LLORCH_SOAK_KEY", "scopes": ["data", "control", "metrics"]}
        ]
    },
}
SOAK_MODELS = ("mock-small", "mock-small", "mock-flaky", "mock-stuck")


@dataclass
class SoakTally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[str] = field(default_factory=set)
    statuses: dict[str, int] = field(default_factory=dict)
    bad_input_5xx: list[str] = field(default_factory=list)
    good_5xx: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: int = 0

    def count(self, kind: str, status: int) -> None:
        with self.lock:
            self.requests += 1
            key = f"{kind} {status}"
            self.statuses[key] = self.statuses.get(key, 0) + 1


class SoakClient:
    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        read_limit: int | None = None,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            sent = {"Content-Type": "application/json"} if body is not None else {}
            if auth:
                sent["Authorization"] = f"Bearer {self.key}"
            sent.update(headers or {})
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            data = response.read(read_limit) if read_limit is not None else response.read()
            return response.status, data
        finally:
            conn.close()


def _soak_task(**fields: object) -> bytes:
    return json.dumps({"model": "mock-small", "prompt": "p", "max_tokens": 4, **fields}).encode()


BadRequest = tuple[str, str, str, "bytes | None", dict[str, str], bool]


def _soak_bad_requests(task_id: str) -> list[BadRequest]:
    """(name, method, path, body, headers, auth): inputs a client gets wrong."""
    text = {"Content-Type": "text/plain"}
    return [
        ("malformed json", "POST", "/v1/tasks", b'{"model": ', {}, True),
        ("wrong type", "POST", "/v1/tasks", _soak_task(max_tokens="4"), {}, True),
        ("unknown field", "POST", "/v1/tasks", _soak_task(x=1), {}, True),
        ("bad utf-8", "POST", "/v1/tasks", b'{"model": "mock-small", "prompt": "\xff"}', {}, True),
        ("huge body", "POST", "/v1/tasks", _soak_task(prompt="x" * 1_100_000), {}, True),
        ("too long prompt", "POST", "/v1/tasks", _soak_task(prompt="y" * 100_001), {}, True),
        ("unknown model", "POST", "/v1/tasks", _soak_task(model="nope"), {}, True),
        ("unknown session", "POST", "/v1/tasks", _soak_task(session_id="s-nope"), {}, True),
        ("no key", "GET", "/v1/tasks", None, {}, False),
        ("bad key", "GET", "/v1/tasks", None, {"Authorization": "Bearer wrong"}, False),
        ("unknown task", "GET", "/v1/tasks/t-nope", None, {}, True),
        ("bad artifact id", "GET", "/v1/artifacts/sha256:xyz", None, {}, True),
        ("bad query", "GET", "/v1/tasks?limit=0&what=1", None, {}, True),
        ("wrong media type", "POST", "/v1/tasks", b"prompt", text, True),
        (
            "bad last-event-id",
            "GET",
            f"/v1/tasks/{task_id}/stream",
            None,
            {"Last-Event-ID": "x"},
            True,
        ),
        ("unknown route", "GET", "/v2/nothing", None, {}, True),
    ]


def _soak_worker(client: SoakClient, tally: SoakTally, deadline: float, seed: int) -> None:
    import random

    rng = random.Random(seed)
    last_task = "t-none"
    while time.monotonic() < deadline:
        roll = rng.random()
        try:
            if roll < 0.55:  # a task, then one of the ways clients follow it
                body = {
                    "model": rng.choice(SOAK_MODELS),
                    "prompt": "soak " + str(rng.random()),
                    "max_tokens": rng.randint(1, 40),
                    "priority": rng.choice(["interactive", "batch"]),
                }
                status, data = client.call("POST", "/v1/tasks", json.dumps(body).encode())
                tally.count("submit", status)
                if status >= 500 and status != 503:
                    tally.good_5xx.append(f"submit {status} {data[:200]!r}")
                if status != 202:
                    continue
                last_task = json.loads(data)["task_id"]
                with tally.lock:
                    tally.accepted.add(last_task)
                follow = rng.random()
                if follow < 0.4:
                    status, _ = client.call("GET", f"/v1/tasks/{last_task}/stream")
                    tally.count("stream", status)
                elif follow < 0.55:  # a reader that leaves early
                    status, _ = client.call("GET", f"/v1/tasks/{last_task}/stream", read_limit=200)
                    tally.count("stream-partial", status)
                elif follow < 0.7:
                    status, _ = client.call("POST", f"/v1/tasks/{last_task}/cancel")
                    tally.count("cancel", status)
                else:
                    status, _ = client.call("GET", f"/v1/tasks/{last_task}")
                    tally.count("get", status)
            elif roll < 0.65:
                content = json.dumps({"kind": "other", "content": "soak " + str(rng.random())})
                status, _ = client.call("POST", "/v1/artifacts", content.encode())
                tally.count("artifact", status)
            else:
                name, method, path, body_bytes, headers, auth = rng.choice(
                    _soak_bad_requests(last_task)
                )
                status, data = client.call(method, path, body_bytes, headers=headers, auth=auth)
                tally.count(f"bad:{name}", status)
                if status >= 500:
                    tally.bad_input_5xx.append(f"{name}: {status} {data[:200]!r}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            with tally.lock:
                tally.errors.append(f"{type(exc).__name__}: {exc}")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cmd_soak(args: list[str]) -> int:
    minutes = 3.0
    if args[:1] == ["--minutes"] and len(args) == 2:
        minutes = float(args[1])
    elif args:
        raise UsageError("soak takes --minutes N")
    ensure_venv()
    port = _free_port()
    key = secrets.token_urlsafe(24)
    data_dir = Path(tempfile.mkdtemp(prefix="llorch-soak-"))
    config_path = data_dir / "soak.yaml"
    config_path.write_text(json.dumps(SOAK_CONFIG, indent=2), encoding="utf-8")
    log_path = data_dir / "server.log"
    step(f"soak: {minutes:g} min of mixed traffic against llorch on port {port} ({config_path})")
    failed = True
    try:
        proc = _start_server(
            port=port,
            config=config_path,
            data_dir=data_dir / "var",
            log_path=log_path,
            env=dict(os.environ, LLORCH_SOAK_KEY=key),
        )
        try:
            _wait_ready(proc, f"http://127.0.0.1:{port}/readyz", CONTRACT_READY_TIMEOUT_S)
            client = SoakClient(port, key)
            tally = SoakTally()
            rss_start = _rss_kib(proc.pid)
            deadline = time.monotonic() + minutes * 60
            workers = [
                threading.Thread(target=_soak_worker, args=(client, tally, deadline, seed))
                for seed in range(SOAK_WORKERS)
            ]
            for worker in workers:
                worker.start()
            rss_peak = rss_start
            # The RSS at the end of each minute: growth that stops after the warm-up, or not.
            rss_by_minute: list[int] = []
            started = time.monotonic()
            while any(w.is_alive() for w in workers):
                time.sleep(1)
                rss = _rss_kib(proc.pid)
                rss_peak = max(rss_peak, rss)
                if time.monotonic() - started >= 60 * (len(rss_by_minute) + 1):
                    rss_by_minute.append(rss)
            rss_end = _rss_kib(proc.pid)
            step(f"traffic over: waiting for the {len(tally.accepted)} accepted tasks to end")
            ends: dict[str, dict[str, object]] = {}
            drain_deadline = time.monotonic() + SOAK_DRAIN_TIMEOUT_S
            pending = set(tally.accepted)
            while pending and time.monotonic() < drain_deadline:
                for task_id in list(pending):
                    status, data = client.call("GET", f"/v1/tasks/{task_id}")
                    task = json.loads(data) if status == 200 else {}
                    if task.get("state") in ("succeeded", "failed", "canceled"):
                        ends[task_id] = task
                        pending.discard(task_id)
                if pending:
                    time.sleep(0.5)
            by_outcome: dict[str, int] = {}
            for task in ends.values():
                error = task.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                outcome = f"failed {code}" if task["state"] == "failed" else str(task["state"])
                by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
            report = {
                "minutes": minutes,
                "requests": tally.requests,
                "accepted": len(tally.accepted),
                "completed": len(ends),
                "outcomes": dict(sorted(by_outcome.items())),
                "lost": len(pending),
                "bad_input_5xx": len(tally.bad_input_5xx),
                "unexpected_5xx": len(tally.good_5xx),
                "client_errors": len(tally.errors),
                "rss_kib": {
                    "start": rss_start,
                    "peak": rss_peak,
                    "end": rss_end,
                    "by_minute": rss_by_minute,
                },
                "rss_growth_kib": rss_end - rss_start,
                "statuses": dict(sorted(tally.statuses.items())),
            }
            print(json.dumps(report, indent=2))
            for line in (tally.bad_input_5xx + tally.good_5xx + tally.errors)[:20]:
                note(line)
            failed = bool(pending or tally.bad_input_5xx or tally.good_5xx)
        finally:
            _stop(proc)
            if failed:
                _print_log_tail(log_path)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 1 if failed else 0


def cmd_bench(args: list[str]) -> int:
    """The benchmarks live in bench/run.py (they need the venv's libraries); see its --help."""
    ensure_venv()
    # The admission profile's load generator: a C client, so the client is never the limit.
    ensure_debian_tool("wrk", "wrk")
    return run([VENV_PY, ROOT / "bench" / "run.py", *args], check=False)


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
