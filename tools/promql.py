"""Metric and label names in PromQL expressions, checked against the metrics contract."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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
# Labels Prometheus adds to every scraped series: an expression may group by them.
TARGET_LABELS = frozenset({"instance", "job"})
# How an expression takes a metric of `scope: cluster` (the same value on every instance).
_MERGED_RE = r"max\s+without\s*\(\s*instance\s*\)\s*\(\s*{metric}\b"
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


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) of every token but white space; ValueError where none matches."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _PROMQL_TOKEN_RE.match(text, pos)
        if match is None:
            raise ValueError(f"cannot read the expression at {text[pos : pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def promql_names(expr: str) -> PromqlNames:
    """Find the metric and label names of a PromQL expression with a small tokenizer.

    Identifiers followed by `(` (or aggregations followed by by/without) are functions or
    aggregations; identifiers inside `{...}`
    followed by a matcher are labels; identifiers in the parentheses after by/on/... are labels;
    the remaining identifiers (but PromQL keywords) are metric names.
    """
    out = PromqlNames()
    try:
        tokens = _tokens(_substitute_grafana_vars(expr))
    except ValueError as exc:
        out.errors.append(str(exc))
        return out
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
            elif value in _PROMQL_GROUPING:
                pass  # `group_left` / `group_right` without a label list
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


def contract_series(contract: dict[str, object]) -> dict[str, tuple[str, set[str]]]:
    """Exposed series name -> (contract metric name, its labels), `le` for histogram series."""
    series: dict[str, tuple[str, set[str]]] = {}
    metrics = contract.get("metrics")
    if not isinstance(metrics, list):
        raise ValueError("the metrics contract has no `metrics` list")
    for spec in metrics:
        name, kind, labels = spec["name"], spec["type"], set(spec["labels"])
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                extra = {"le"} if suffix == "_bucket" else set()
                series[name + suffix] = (name, labels | extra)
        else:
            series[name] = (name, labels)
    return series


def cluster_metrics(contract: dict[str, object]) -> frozenset[str]:
    """The metrics of `scope: cluster`: every instance of a cluster exports the same value."""
    metrics = contract.get("metrics")
    assert isinstance(metrics, list)
    return frozenset(m["name"] for m in metrics if m.get("scope") == "cluster")


def check_cluster_scope(expr: str, cluster: frozenset[str], where: str) -> list[str]:
    """Every use of a cluster-scope metric must be merged over instances first, with
    `max without (instance) (metric…)`: a sum over instances counts it once per instance."""
    errors = []
    for metric in sorted(cluster):
        uses = len(re.findall(rf"\b{metric}\b", expr))
        merged = len(re.findall(_MERGED_RE.format(metric=metric), expr))
        if uses > merged:
            errors.append(
                f"{where}: {metric} is the cluster's state (the same on every instance): "
                f"take max without (instance) ({metric}…) before aggregating it"
            )
    return errors


def check_expr(
    expr: str, series: dict[str, tuple[str, set[str]]], where: str, legend: str = ""
) -> list[str]:
    """Problems of one expression: metric names and labels the contract does not define."""
    names = promql_names(expr)
    errors = [f"{where}: {e}" for e in names.errors]
    known_labels: set[str] = set(TARGET_LABELS)
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
