"""The walk-cost model: how rmap_walk_ksm's walk time grows with the walked workload's VMA
count and with the mappings per KSM page, per kernel and trigger; and, for the series' own
benchmark shape (pattern one-content), the published figures beside the measured ones.
pandas/numpy only, from the latency summary (one point per workload row), no walks.

Why this shape: the old walk visits, for each mapping of the KSM page, the whole anon_vma
interval tree of the mapping process, so its cost is about (mappings) x (VMAs); the new
one keeps the page index in the rmap item and goes straight to the VMA, so it stays flat.

Fits (stated in every report): for each kernel, trigger, walk function (rmap_one: a walk
that stops once the page is unmapped costs about half of one that visits every mapping),
timing method and statistic (p50, p99), the points are the workload rows at one mapping
count (for VMAs) or at one VMA count (for mappings). Two least-squares fits over those
points:
- linear, y = a + b x: b is the cost per 1,000 VMAs (or per mapping) in µs, with R²;
- log-log, log y = c + k log x: k is the growth exponent (1: linear, 0: flat), with R².
Fewer than 2 distinct x: no fit ("not fitted"). With 2 points R² is 1 by construction.
Shape: "flat" when k < 0.15 (under 1.4x growth per 10x VMAs); "grows ~linearly" when
linear R² >= 0.9 and 0.5 <= k <= 1.3; "faster than linearly" when k > 1.3; otherwise
"grows as x^k".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

STATISTICS = ("p50", "p99")
FLAT_EXPONENT = 0.15
LINEAR_R2 = 0.9
LINEAR_MIN_EXPONENT = 0.5
# Above this the growth is called faster than linear: under TCG the old walk's cost per
# VMA rises with the tree's size (cache misses), seen as k ~1.5 at 2,000-10,000 VMAs.
LINEAR_MAX_EXPONENT = 1.3
AXES = {  # x column -> (held column, words for x, unit of the linear slope)
    "vmas": ("mappings", "VMAs", 1000),
    "mappings": ("vmas", "mappings per KSM page", 1),
}
FIT_NOTES = (
    "Walk-cost model: one point per workload row (its p50 or p99 walk over every walk of "
    "that row), fitted per kernel, trigger and timing method against VMA count at one "
    "mapping count, and against mappings per KSM page at one VMA count.",
    "Two least-squares fits: linear y = a + b x (b: µs per 1,000 VMAs, or per mapping) "
    "and log-log log y = c + k log x (k: growth exponent, 1 linear, 0 flat), each with "
    "R² and the number of points; no fit with fewer than 2 distinct x, and R² is 1 by "
    f"construction with 2 points. 'flat': k < {FLAT_EXPONENT}; 'grows ~linearly': linear "
    f"R² ≥ {LINEAR_R2} and {LINEAR_MIN_EXPONENT} ≤ k ≤ {LINEAR_MAX_EXPONENT}; 'faster than "
    f"linearly': k > {LINEAR_MAX_EXPONENT}.",
)
# The series' own benchmark (the rmap_walk_ksm patch's cover letter): one process, 20,000
# pages of one content, every other page mprotected, one page migrated with move_pages.
PUBLISHED: dict[str, Any] = {
    "vmas": 20_000,
    "before_max_ms": 705.0,
    "after_max_ms": 1.7,
    "where": "real hardware",
}
ONE_CONTENT = "one-content"
RMAP_BENCH_SPEC = "rmap-bench"


@dataclass(frozen=True)
class WalkCost:
    """points: kernel, trigger, method, workload, vmas, mappings, statistic, value_us, n;
    fits: one row per kernel, trigger, method, x, held level and statistic (see module)."""

    points: pd.DataFrame
    fits: pd.DataFrame
    sentences: list[str] = field(default_factory=list)


def _num(v: float) -> str:
    """A number for a sentence: thousands separators, 3 significant digits below 100."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _r2(r2: float) -> str:
    return "n/a (constant)" if math.isnan(r2) else f"{r2:.2f}"


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y = a + b x: (b, a, R²); R² NaN when y does not vary."""
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    return float(b), float(a), r2


def shape_of(exponent: float, linear_r2: float) -> str:
    """The growth in words (see the module docstring for the thresholds)."""
    if exponent < FLAT_EXPONENT:
        return "flat"
    if exponent > LINEAR_MAX_EXPONENT:
        return f"grows faster than linearly (x^{exponent:.2f})"
    if exponent >= LINEAR_MIN_EXPONENT and linear_r2 >= LINEAR_R2:
        return "grows ~linearly"
    return f"grows as x^{exponent:.2f}"


def fit_points(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Both fits of y (µs) on x (counts >= 1), or a note saying why there is none."""
    out: dict[str, Any] = {"n_points": len(x), "n_x": len(np.unique(x))}
    if out["n_x"] < 2:
        return out | {"note": "not fitted: fewer than 2 distinct x"}
    if (x <= 0).any() or (y <= 0).any():
        return out | {"note": "not fitted: a count or time <= 0 has no logarithm"}
    slope, intercept, r2 = fit_line(x.astype(float), y.astype(float))
    k, _c, r2_log = fit_line(np.log(x.astype(float)), np.log(y.astype(float)))
    lo, hi = np.argmin(x), np.argmax(x)
    return out | {
        "slope_us": slope,
        "intercept_us": intercept,
        "linear_r2": r2,
        "exponent": k,
        "loglog_r2": r2_log,
        "x_min": float(x[lo]),
        "x_max": float(x[hi]),
        "y_at_x_min_us": float(y[lo]),
        "y_at_x_max_us": float(y[hi]),
        "shape": shape_of(k, r2 if not math.isnan(r2) else 1.0),
        "note": "",
    }


def walk_cost_points(summary: pd.DataFrame) -> pd.DataFrame:
    """p50 and p99 of every attributed workload row with a VMA count: the model's points."""
    s = summary[
        summary["statistic"].isin(STATISTICS)
        & (summary["target_kind"] != "unattributed")
        & summary["vmas"].notna()
    ]
    cols = ["kernel", "trigger", "method", "workload", "vmas", "mappings", "statistic"]
    out = s[[*cols, "value_us", "n"]].reset_index(drop=True)
    walk = s["rmap_one"] if "rmap_one" in s.columns else pd.Series(None, index=s.index)
    return out.assign(rmap_one=walk.astype(object).where(walk.notna(), "").to_numpy())


def _fits_along(points: pd.DataFrame, x: str) -> list[dict[str, Any]]:
    """Fits against x, one per level of the held column; when no level has 2 distinct x,
    one "not fitted" row per kernel, trigger, method and statistic instead."""
    held, _words, _per = AXES[x]
    rows = []
    p = points.assign(_held=points[held].astype("Float64").fillna(-1))
    by = ["kernel", "trigger", "rmap_one", "method", "statistic"]
    for key, grp in p.groupby(by, sort=False):
        d = grp.dropna(subset=[x])
        fitted = []
        for level, g in d.groupby("_held", sort=True):
            r = fit_points(g[x].to_numpy(dtype=float), g["value_us"].to_numpy(dtype=float))
            if not r.get("note"):
                held_level = None if level < 0 else int(level)
                fitted.append({"held": held_level} | r)
        if not fitted:
            n_x = max((g[x].nunique() for _, g in d.groupby("_held")), default=0)
            note = f"not fitted: fewer than 2 distinct {AXES[x][1]} at any {AXES[held][1]}"
            fitted = [{"held": None, "n_points": len(d), "n_x": n_x, "note": note}]
        base = dict(zip(by, key, strict=True))
        rows += [base | {"x": x, "held_column": held} | f for f in fitted]
    return rows


def _kernel_sentence(kernel: str, fits: pd.DataFrame) -> str:
    """One sentence: per trigger, how p50 grows with VMAs (and with mappings if fitted)."""
    parts = []
    f = fits[(fits["kernel"] == kernel) & (fits["statistic"] == "p50")]
    for (trigger, walk), g in f.groupby(["trigger", "rmap_one"], sort=False):
        parts.append(_trigger_clause(f"{trigger} via {walk}" if walk else str(trigger), g))
    if not parts:
        return ""
    how = "p50, linear least squares with R² and points, log-log exponent"
    return f"{kernel} ({how}): " + "; ".join(parts) + "."


def _best(g: pd.DataFrame) -> pd.Series:
    """The fit with most points, a fitted one before a refused one."""
    g = g.assign(_ok=g["note"].fillna("") == "").sort_values(
        ["_ok", "n_points"], ascending=False, kind="stable"
    )
    return g.iloc[0]


def _trigger_clause(trigger: str, g: pd.DataFrame) -> str:
    out = []
    for x in ("vmas", "mappings"):
        gx = g[g["x"] == x]
        if gx.empty:
            continue
        r = _best(gx)
        _held, words, per = AXES[x]
        if r["note"]:
            if x == "vmas":
                out.append(f"{trigger} p50 against {words}: {r['note']}")
            continue
        unit = f"per {per:,} VMAs" if per > 1 else "per mapping"
        held = ""
        if r["held"] is not None and not pd.isna(r["held"]):
            held = f" ({int(r['held']):,} {'mappings/page' if x == 'vmas' else 'VMAs'})"
        lead = f"{trigger} {r['shape']} in VMAs" if x == "vmas" else f"in mappings {r['shape']}"
        span = (
            f", {_num(r['y_at_x_min_us'])} → {_num(r['y_at_x_max_us'])} µs "
            f"from {_num(r['x_min'])} to {_num(r['x_max'])}"
        )
        out.append(
            f"{lead}{held}: {'+' if r['slope_us'] >= 0 else ''}{_num(r['slope_us'] * per)} µs "
            f"{unit} (R² {_r2(r['linear_r2'])}, {r['n_points']} points, exponent "
            f"{r['exponent']:.2f}){span if x == 'vmas' else ''}"
        )
    return ", ".join(out) if out else f"{trigger}: no attributed walks with a VMA count"


def walk_cost_model(summary: pd.DataFrame, kernels: Sequence[str] = ()) -> WalkCost | None:
    """The walk-cost model from a latency summary with workload columns; None when no
    attributed walk has a VMA count. Sentences: one per kernel, reference first."""
    points = walk_cost_points(summary)
    if points.empty:
        return None
    # Proxy-timed walks are fitted too, but a sentence speaks for the exact method.
    rows = _fits_along(points, "vmas") + _fits_along(points, "mappings")
    fits = pd.DataFrame(rows)
    exact = fits[~fits["method"].isin(["tracepoint-proxy"])]
    order = list(dict.fromkeys([*kernels, *fits["kernel"]]))
    sentences = [s for k in order if (s := _kernel_sentence(k, exact if len(exact) else fits))]
    return WalkCost(points, fits, sentences)


# --------------------------------------------------------------------------- published shape


def is_rmap_bench(spec_names: Sequence[str], summary: pd.DataFrame) -> bool:
    """The series' benchmark shape: spec rmap-bench, or any walk of the one-content pattern."""
    return RMAP_BENCH_SPEC in spec_names or bool((summary["pattern"] == ONE_CONTENT).any())


def published_comparison(summary: pd.DataFrame, kernels: Sequence[str]) -> pd.DataFrame | None:
    """Per trigger and walk function, at the largest VMA count walked on both kernels
    (one-content rows when there are any): max and p50 before (reference kernel) and
    after, in ms, and the ratio before/after; a first row with the published figures.
    None without two kernels."""
    if len(kernels) < 2:
        return None
    s = summary[(summary["target_kind"] != "unattributed") & summary["vmas"].notna()]
    if (s["pattern"] == ONE_CONTENT).any():
        s = s[s["pattern"] == ONE_CONTENT]
    before, after = kernels[0], kernels[1]
    rows: list[dict[str, Any]] = [
        {
            "source": f"published ({PUBLISHED['where']})",
            "trigger": "migrate (move_pages)",
            "VMAs": PUBLISHED["vmas"],
            "max before (ms)": PUBLISHED["before_max_ms"],
            "max after (ms)": PUBLISHED["after_max_ms"],
            "max ratio before/after": PUBLISHED["before_max_ms"] / PUBLISHED["after_max_ms"],
            "p50 before (ms)": math.nan,
            "p50 after (ms)": math.nan,
            "p50 ratio before/after": math.nan,
        }
    ]
    exact = s[s["method"] != "tracepoint-proxy"]
    walk = exact["rmap_one"] if "rmap_one" in exact.columns else pd.Series(None, index=exact.index)
    exact = exact.assign(_walk=walk.astype(object).where(walk.notna(), ""))
    for (trigger, walk_func), g in exact.groupby(["trigger", "_walk"], sort=False):
        both = g.groupby("vmas")["kernel"].agg(lambda k: {before, after} <= set(k))
        if not both.any():
            continue
        vmas = int(both[both].index.max())
        at = g[g["vmas"] == vmas]

        def ms(kernel: str, stat: str, at: pd.DataFrame = at) -> float:
            v = at[(at["kernel"] == kernel) & (at["statistic"] == stat)]["value_us"]
            return float(v.max()) / 1e3 if len(v) else math.nan

        rows.append(
            {
                "source": f"this run ({before} → {after})",
                "trigger": f"{trigger} via {walk_func}" if walk_func else str(trigger),
                "VMAs": vmas,
                "max before (ms)": ms(before, "max"),
                "max after (ms)": ms(after, "max"),
                "max ratio before/after": ms(before, "max") / ms(after, "max"),
                "p50 before (ms)": ms(before, "p50"),
                "p50 after (ms)": ms(after, "p50"),
                "p50 ratio before/after": ms(before, "p50") / ms(after, "p50"),
            }
        )
    return pd.DataFrame(rows) if len(rows) > 1 else None
