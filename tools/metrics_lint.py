"""``xtask.py metrics-lint``: dashboards and alert rules against contracts/metrics.yaml.

Every metric and label a Grafana panel or an alert rule uses must be in the metrics contract;
then promtool checks the rules and runs their unit tests (installed with apt-get if missing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import yaml

from tools.common import ROOT, TaskError, main, no_args, note, rel, run, step
from tools.debian import ensure_promtool
from tools.promql import (
    check_cluster_scope,
    check_expr,
    cluster_metrics,
    contract_series,
    promql_names,
)

METRICS_CONTRACT = ROOT / "contracts" / "metrics.yaml"
DASHBOARDS_DIR = ROOT / "ci" / "dashboards"
ALERT_RULES = ROOT / "ci" / "alerts" / "llorch.yaml"
ALERT_TESTS = ROOT / "ci" / "alerts" / "llorch_test.yaml"


def _load_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TaskError(f"cannot parse {rel(path)}:\n{exc}") from exc


def _dashboard_targets(dashboard: dict[str, object]) -> Iterator[tuple[str, dict[str, object]]]:
    """(panel title, target) of every panel, rows' collapsed panels included."""
    panels = list(dashboard.get("panels") or [])  # type: ignore[call-overload]
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels") or [])
        for target in panel.get("targets") or []:
            yield str(panel.get("title", "?")), target


def lint_dashboards(
    series: dict[str, tuple[str, set[str]]], cluster: frozenset[str] = frozenset()
) -> tuple[list[str], int]:
    errors: list[str] = []
    count = 0
    paths = sorted(DASHBOARDS_DIR.glob("*.json"))
    if not paths:
        errors.append(f"{rel(DASHBOARDS_DIR)}: no dashboard")
    for path in paths:
        where = rel(path)
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
            errors += check_cluster_scope(expr, cluster, target_where)
            names = promql_names(expr)
            for metric, labels in names.selectors:
                if "pool_id" in series.get(metric, ("", set()))[1] and "pool_id" not in labels:
                    errors.append(f"{target_where}: {metric} is not filtered by $pool_id")
    return errors, count


def lint_alerts(
    series: dict[str, tuple[str, set[str]]], cluster: frozenset[str] = frozenset()
) -> tuple[list[str], int]:
    errors: list[str] = []
    where = rel(ALERT_RULES)
    rules_doc = _load_yaml(ALERT_RULES)
    alerts: list[str] = []
    groups = rules_doc.get("groups") if isinstance(rules_doc, dict) else None
    for group in groups or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record") or "?"
            rule_where = f"{where}: {name}"
            errors += check_expr(str(rule.get("expr", "")), series, rule_where)
            errors += check_cluster_scope(str(rule.get("expr", "")), cluster, rule_where)
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
    tests_doc = _load_yaml(ALERT_TESTS)
    firing: set[str] = set()
    quiet: set[str] = set()
    tests = tests_doc.get("tests") if isinstance(tests_doc, dict) else None
    for test in tests or []:
        for case in test.get("alert_rule_test") or []:
            (firing if case.get("exp_alerts") else quiet).add(case.get("alertname"))
    for name in alerts:
        for seen, what in ((firing, "firing"), (quiet, "not firing")):
            if name not in seen:
                errors.append(f"{rel(ALERT_TESTS)}: no test of {name} {what}")
    return errors, len(alerts)


def cmd_metrics_lint(args: list[str]) -> int:
    no_args("metrics-lint", args)
    step("metrics-lint: dashboards and alert rules against contracts/metrics.yaml")
    contract = _load_yaml(METRICS_CONTRACT)
    if not isinstance(contract, dict):
        raise TaskError(f"{rel(METRICS_CONTRACT)}: not a mapping")
    series, cluster = contract_series(contract), cluster_metrics(contract)
    dash_errors, exprs = lint_dashboards(series, cluster)
    alert_errors, alerts = lint_alerts(series, cluster)
    errors = dash_errors + alert_errors
    if errors:
        print("\n".join(f"  {e}" for e in errors))
        note(f"metrics-lint found {len(errors)} problem(s)")
        return 1
    print(f"{exprs} dashboard expressions and {alerts} alerts use contract metrics and labels only")
    promtool = ensure_promtool()
    step(f"promtool check rules {rel(ALERT_RULES)}")
    run([promtool, "check", "rules", ALERT_RULES])
    step(f"promtool test rules {rel(ALERT_TESTS)}")
    run([promtool, "test", "rules", ALERT_TESTS])
    return 0


# Filled by cmd_test from pytest's JUnit report: (passed, failed, skipped).


if __name__ == "__main__":
    raise SystemExit(main("metrics-lint", cmd_metrics_lint))
