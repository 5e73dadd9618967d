"""The PromQL reader of metrics-lint: the names an expression uses, and those the contract lacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tools.promql import check_cluster_scope, check_expr, contract_series, promql_names

ROOT = Path(__file__).resolve().parents[2]
SERIES = {
    "llorch_tasks_total": ("llorch_tasks_total", {"pool_id", "outcome"}),
    "llorch_ttft_seconds_bucket": ("llorch_ttft_seconds", {"pool_id", "le"}),
}


def test_selectors_labels_and_grouping_are_told_apart() -> None:
    expr = (
        'sum by (pool_id) (rate(llorch_tasks_total{pool_id=~"$pool_id", outcome="failed"}'
        "[$__rate_interval])) / ignoring(outcome) group_left llorch_up"
    )
    names = promql_names(expr)
    assert names.errors == []
    assert names.selectors == [
        ("llorch_tasks_total", ["pool_id", "outcome"]),
        ("llorch_up", []),
    ]
    assert names.grouping == ["pool_id", "outcome"]


def test_functions_keywords_and_strings_are_not_metrics() -> None:
    expr = 'histogram_quantile(0.99, sum without (x) (rate(a_bucket{le!="+Inf"}[5m]))) > bool 1'
    names = promql_names(expr)
    assert [metric for metric, _ in names.selectors] == ["a_bucket"]
    assert names.grouping == ["x"]


def test_what_is_not_promql_is_an_error() -> None:
    assert promql_names("rate(x[5m]) ~ 1").errors == ["cannot read the expression at '~ 1'"]


def test_matching_by_name_is_refused() -> None:
    assert promql_names('{__name__="llorch_up"}').errors == [
        "match metrics by name, not by __name__"
    ]


def test_a_clean_expression_has_no_problem() -> None:
    expr = 'sum by (pool_id) (rate(llorch_tasks_total{outcome="succeeded"}[5m]))'
    assert check_expr(expr, SERIES, "here", legend="{{pool_id}}") == []


@pytest.mark.parametrize(
    ("expr", "legend", "problem"),
    [
        ("llorch_tasks", "", "here: metric llorch_tasks is not in the contract (counters are"),
        ('llorch_tasks_total{replica="a"}', "", "here: llorch_tasks_total has no label 'replica'"),
        ("sum by (replica) (llorch_tasks_total)", "", "here: label 'replica' is not a label"),
        ("llorch_tasks_total", "{{replica}}", "here: the legend names 'replica'"),
        ("1 + 1", "", "here: uses no contract metric"),
        ('{pool_id="a"}', "", "here: a selector without a metric name"),
    ],
)
def test_what_the_contract_lacks_is_named(expr: str, legend: str, problem: str) -> None:
    problems = check_expr(expr, SERIES, "here", legend=legend)
    assert any(p.startswith(problem) for p in problems), problems


def test_histograms_expose_bucket_sum_and_count_and_buckets_have_le() -> None:
    contract = yaml.safe_load((ROOT / "contracts" / "metrics.yaml").read_text(encoding="utf-8"))
    series = contract_series(contract)
    histograms = [m for m in contract["metrics"] if m["type"] == "histogram"]
    assert histograms
    name = histograms[0]["name"]
    assert "le" in series[f"{name}_bucket"][1]
    assert "le" not in series[f"{name}_sum"][1]
    assert series[f"{name}_count"][0] == name
    with pytest.raises(ValueError, match="no `metrics` list"):
        contract_series({})


@pytest.mark.req("ORCH-STATE-0055")
def test_a_cluster_scope_gauge_must_be_merged_over_instances_first() -> None:
    cluster = frozenset({"llorch_queue_depth"})
    merged = 'sum by (pool_id) (max without (instance) (llorch_queue_depth{pool_id=~"x"}))'
    summed = 'sum by (pool_id) (llorch_queue_depth{pool_id=~"x"})'

    assert check_cluster_scope(merged, cluster, "p") == []
    assert check_cluster_scope(summed, cluster, "p") != []
    assert check_cluster_scope(f"{merged} + {summed}", cluster, "p") != []


def test_the_target_labels_may_be_grouped_by() -> None:
    assert check_expr("max without (instance) (llorch_tasks_total)", SERIES, "p") == []
