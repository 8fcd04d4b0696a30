"""Markdown and plain-text rendering of analysis results (tables, comparisons)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.results.analysis.common import TRIAL_METRICS
from orchestrator.results.analysis.compare import ComparisonResult


def fmt_value(v: Any, column: str = "") -> str:
    """A table cell: NaN as an en dash, p-values in 2 significant digits, counts with
    thousands separators, other floats to a precision that suits their size."""
    if v is None or (not isinstance(v, str | bool | np.bool_) and pd.isna(v)):
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        v = float(v)
        if column.startswith("p_") or column == "p":
            return f"{v:.2g}" if v > 0 else "< 1e-300"  # below double precision
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        a = abs(v)
        return (
            f"{v:,.0f}"
            if a >= 1000
            else f"{v:.0f}"
            if a >= 100
            else f"{v:.1f}"
            if a >= 10
            else f"{v:.3g}"
        )
    return str(v)


def fmt_interval(value: float, lo: float, hi: float) -> str:
    """'value [lo, hi]', or the value alone when there is no interval."""
    if pd.isna(lo) or pd.isna(hi):
        return fmt_value(value)
    return f"{fmt_value(value)} [{fmt_value(lo)}, {fmt_value(hi)}]"


def verdict(row: pd.Series, higher: str = "a higher", lower: str = "a lower") -> str:
    """Plain words for one comparison row (ratio = a / b)."""
    if pd.isna(row.get("p_value")):
        return "too few samples"
    if row.get("significant"):
        return higher if row["ratio"] > 1 else lower
    return "no clear difference"


def comparison_display(
    df: pd.DataFrame, a: str = "a", b: str = "b", numerator: str | None = None
) -> pd.DataFrame:
    """Human columns for a comparison table: n and medians of a and b, the ratio
    numerator/other with its interval, Holm p, Cliff's delta (numerator larger: > 0) and a
    verdict. numerator defaults to a (ratio a/b); pass b when the table holds b / a."""
    num = numerator or a
    den = b if num == a else a
    out = pd.DataFrame(index=df.index)
    out[f"n ({a}/{b})"] = [
        f"{fmt_value(x)}/{fmt_value(y)}" for x, y in zip(df["n_a"], df["n_b"], strict=True)
    ]
    med = "median_a_us" if "median_a_us" in df else "median_a"
    unit = " (µs)" if med.endswith("_us") else ""
    out[f"median {a}{unit}"] = df[med].map(fmt_value)
    out[f"median {b}{unit}"] = df[med.replace("_a", "_b")].map(fmt_value)
    out[f"ratio {num}/{den} [95% CI]"] = [
        fmt_interval(*r) for r in df[["ratio", "ratio_lo", "ratio_hi"]].itertuples(index=False)
    ]
    if "p99_ratio" in df:
        out[f"p99 ratio {num}/{den} [95% CI]"] = [
            fmt_interval(*r)
            for r in df[["p99_ratio", "p99_ratio_lo", "p99_ratio_hi"]].itertuples(index=False)
        ]
    out["p (Holm)"] = df["p_holm"].map(lambda v: fmt_value(v, "p"))
    out["Cliff's δ"] = [
        f"{fmt_value(d)} ({m})" for d, m in zip(df["cliffs_delta"], df["magnitude"], strict=True)
    ]
    names = df["kernel_a"] if num == "a" and "kernel_a" in df else pd.Series(num, df.index)
    out["verdict"] = [
        verdict(r, f"{name} higher", f"{name} lower")
        for name, (_, r) in zip(names, df.iterrows(), strict=True)
    ]
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; cells formatted with fmt_value, pipes escaped."""
    if df.empty:
        return "_(no rows)_"
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = [
        "| " + " | ".join(fmt_value(v, str(c)).replace("|", "\\|") for c, v in row.items()) + " |"
        for _, row in df.iterrows()
    ]
    return "\n".join([head, rule, *body])


def _comparison_tables(result: ComparisonResult) -> list[tuple[str, pd.DataFrame]]:
    tables = []
    if not result.metrics.empty:
        m = result.metrics
        keys = pd.DataFrame(
            {
                "kernel (A → B)": m["kernel_a"] + " → " + m["kernel_b"],
                "fleet size": m["fleet_size"],
                "metric": m["metric"].map(TRIAL_METRICS),
            }
        )
        tables.append(
            (
                "Per-trial metrics",
                pd.concat([keys, comparison_display(m, "A", "B", numerator="B")], axis=1),
            )
        )
    if result.latency is not None and not result.latency.empty:
        lat = result.latency
        keys = pd.DataFrame(
            {
                "kernel (A → B)": lat["kernel_a"] + " → " + lat["kernel_b"],
                "trigger": lat["trigger"],
                "workload": lat["workload"],
                "method": lat["method_label"],
            }
        )
        tables.append(
            (
                "rmap_walk_ksm latency (pooled walks)",
                pd.concat([keys, comparison_display(lat, "A", "B", numerator="B")], axis=1),
            )
        )
    return tables


def render_comparison(result: ComparisonResult, fmt: str = "markdown") -> str:
    """The comparison as markdown (fmt="markdown") or plain text (fmt="text")."""
    lines = [
        f"# {result.run_b} (B) against {result.run_a} (A), spec {result.spec_name}",
        "",
        "Ratios are B / A with 95% bootstrap intervals; p is the two-sided Mann-Whitney "
        "U p-value, Holm-adjusted; Cliff's δ > 0 means B tends to be larger. A "
        "difference is called only when p < 0.05 and the interval excludes 1.",
        "",
    ]
    if result.warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in result.warnings], ""]
    tables = _comparison_tables(result)
    if not tables:
        lines.append("Nothing to compare: no kernel and fleet size measured in both runs.")
    for title, table in tables:
        body = markdown_table(table) if fmt == "markdown" else table.to_string(index=False)
        lines += [f"## {title}", "", body, ""]
    return "\n".join(lines).rstrip() + "\n"
