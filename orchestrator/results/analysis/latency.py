"""rmap_walk_ksm walk-time statistics, kept apart per trigger, workload and method."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from orchestrator.results.analysis.common import (
    LATENCY_QUANTILES,
    TAIL_MIN,
    method_label,
)
from orchestrator.results.analysis.labels import (
    WORKLOAD_COLUMNS,
)
from orchestrator.results.analysis.load import Run
from orchestrator.results.analysis.metrics import successful
from orchestrator.results.analysis.stats import (
    N_BOOT,
    _comparison_row,
    _finish_comparisons,
    compare_samples,
    min_attainable_p,
    quantile_interval,
    quantile_rank,
    quantile_ratio,
)
from orchestrator.results.analysis.walks import CAP, read_walks, walk_combos
from orchestrator.walkcost import WalkCost, walk_cost_model

__all__ = [
    "LATENCY_KEYS",
    "LatencyAnalysis",
    "LatencyKey",
    "analyze_latency",
    "latency_by_vmas",
    "latency_comparisons",
    "latency_ecdf",
    "latency_summary",
    "latency_trial_comparisons",
    "with_workload_columns",
]


@dataclass(frozen=True)
class LatencyAnalysis:
    """rmap_walk_ksm walk times. Durations in the tables are in microseconds (µs). Every
    table keeps workloads apart: rows are per (kernel,) trigger, workload and method, the
    workload being target_kind, pattern, vmas and mappings (see normalise_latency)."""

    n_samples: int
    n_unattributed: int
    workloads: pd.DataFrame  # index workload label: target_kind, pattern, vmas, mappings
    summary: pd.DataFrame  # kernel, trigger, workload, ..., method, statistic, value_us, ...
    comparisons: pd.DataFrame  # pooled walks, kernel a vs reference b, per row
    trial_comparisons: pd.DataFrame  # per-trial medians as the units
    ecdf: pd.DataFrame  # kernel, trigger, workload, method, duration_us, fraction, n_walks
    by_vmas: pd.DataFrame | None  # attributed walks: kernel, trigger, method, vmas bins
    walk_cost: WalkCost | None = None
    sampled_rows: int = 0  # rows summarised from a sample of about `cap` walks (walks.py)
    cap: int = CAP


class LatencyKey(NamedTuple):
    """One row of every latency table: walks of one kernel, trigger, workload and method."""

    kernel: str
    trigger: str
    workload: str
    method: str


LATENCY_KEYS = list(LatencyKey._fields)


def _key(k: tuple[Any, ...]) -> LatencyKey:
    return LatencyKey(*(str(x) for x in k))


def _latency_groups(lat: pd.DataFrame) -> dict[LatencyKey, np.ndarray]:
    """Sorted walk durations (ns) per LatencyKey; one sort serves every quantile, interval
    and ECDF point of the group."""
    dur = lat["duration_ns"].to_numpy()
    if not all(isinstance(lat[k].dtype, pd.CategoricalDtype) for k in LATENCY_KEYS):
        grouped = lat.groupby(LATENCY_KEYS, observed=True, sort=True)
        return {_key(k): np.sort(dur[idx]) for k, idx in grouped.indices.items()}
    # Categoricals (as the walk reader gives them): one combined code per row and one
    # stable radix sort of it, in the order groupby(sort=True) gives, ~10x cheaper.
    cats = [lat[k].cat.categories for k in LATENCY_KEYS]
    key = np.zeros(len(lat), dtype=np.int64)
    known = np.ones(len(lat), dtype=bool)
    for k, c in zip(LATENCY_KEYS, cats, strict=True):
        codes = lat[k].cat.codes.to_numpy()
        known &= codes >= 0  # a missing label: in no row, as groupby drops it
        key = key * max(len(c), 1) + codes
    rows = np.flatnonzero(known)
    order = rows[np.argsort(key[rows], kind="stable")]
    uniq, start = np.unique(key[order], return_index=True)
    out = {}
    for u, lo, hi in zip(uniq, start, [*start[1:], len(order)], strict=True):
        labels, rest = [], int(u)
        for c in reversed(cats):
            labels.append(str(c[rest % max(len(c), 1)]))
            rest //= max(len(c), 1)
        out[LatencyKey(*reversed(labels))] = np.sort(dur[order[lo:hi]])
    return out


def _key_row(key: LatencyKey) -> dict[str, Any]:
    return key._asdict() | {"method_label": method_label(key.method)}


def with_workload_columns(df: pd.DataFrame, workloads: pd.DataFrame) -> pd.DataFrame:
    """df (with a workload column) with target_kind, pattern, vmas and mappings after it."""
    if df.empty:
        return df
    at = list(df.columns).index("workload") + 1
    attrs = workloads.loc[df["workload"], list(WORKLOAD_COLUMNS)].reset_index(drop=True)
    attrs.index = df.index
    return pd.concat([df.iloc[:, :at], attrs, df.iloc[:, at:]], axis=1)


def _latency_rows(
    key: LatencyKey,
    x: np.ndarray,
    lower_bound: bool,
    rng: np.random.Generator,
    n_boot: int,
    n_all: int | None = None,
) -> list[dict[str, Any]]:
    n, rows = len(x), []
    base = _key_row(key) | {"lower_bound": lower_bound, "n": n_all or n, "n_sampled": n}
    for name, q in LATENCY_QUANTILES.items():
        est = quantile_interval(x, q, n_boot=n_boot, rng=rng)
        tail = n - quantile_rank(q, n)
        note = (
            f"only {tail} samples beyond p{q * 100:g}: interval unreliable"
            if tail < TAIL_MIN
            else ""
        )
        rows.append(
            base
            | {
                "statistic": name,
                "value_us": est.value / 1e3,
                "lo_us": est.lo / 1e3,
                "hi_us": est.hi / 1e3,
                "note": note,
            }
        )
    rows.append(
        base
        | {
            "statistic": "max",
            "value_us": float(x[-1]) / 1e3,
            "lo_us": math.nan,
            "hi_us": math.nan,
            "note": "no interval: a bootstrap cannot bound a max",
        }
    )
    return rows


def latency_summary(
    groups: dict[LatencyKey, np.ndarray],
    lower_bound: dict[LatencyKey, bool],
    *,
    rng: np.random.Generator,
    n_boot: int = N_BOOT,
    counts: dict[tuple[str, ...], int] | None = None,
) -> pd.DataFrame:
    """Long table: per LatencyKey and statistic (p50 .. p99.9, max), the value and interval
    in µs, n (every walk of the row, counts[key] when given), n_sampled (the walks the
    statistics are computed from) and a note; lower_bound marks methods that under-read
    walks."""
    counts = counts or {}
    rows = [
        r
        for k, x in groups.items()
        for r in _latency_rows(k, x, lower_bound[k], rng, n_boot, counts.get(k))
    ]
    return pd.DataFrame(rows)


def _latency_pairs(
    keys: Sequence[LatencyKey], kernels: Sequence[str]
) -> Iterator[tuple[LatencyKey, LatencyKey]]:
    """(candidate key, reference key): kernels compared only within the same trigger,
    workload and timing method, each against the reference kernel."""
    present = set(keys)
    for trigger, workload, method in dict.fromkeys(k[1:] for k in keys):
        ref = LatencyKey(kernels[0], trigger, workload, method)
        for kernel in kernels[1:]:
            cand = LatencyKey(kernel, trigger, workload, method)
            if ref in present and cand in present:
                yield cand, ref


def _pair_row(cand: LatencyKey, ref: LatencyKey) -> dict[str, Any]:
    return {
        "trigger": cand.trigger,
        "workload": cand.workload,
        "method": cand.method,
        "method_label": method_label(cand.method),
        "kernel_a": cand.kernel,
        "kernel_b": ref.kernel,
    }


def latency_comparisons(
    groups: dict[LatencyKey, np.ndarray],
    kernels: Sequence[str],
    *,
    rng: np.random.Generator,
    n_boot: int = N_BOOT,
) -> pd.DataFrame:
    """Pooled walks: ratio of medians and of p99 (kernel a / reference b) with bootstrap
    intervals, Mann-Whitney U p (Holm-adjusted over the table) and Cliff's delta."""
    rows = []
    for cand, ref in _latency_pairs(list(groups), kernels):
        a, b = groups[cand], groups[ref]
        c = compare_samples(a, b, n_boot=n_boot, rng=rng)
        p99 = quantile_ratio(a, b, 0.99, n_boot=n_boot, rng=rng)
        rows.append(
            _pair_row(cand, ref)
            | _comparison_row(c)
            | {"p99_ratio": p99.value, "p99_ratio_lo": p99.lo, "p99_ratio_hi": p99.hi}
        )
    out = _finish_comparisons(rows)
    for col in ("median_a", "median_b"):
        if col in out:
            out[col] = out[col] / 1e3  # ns -> µs
    return out.rename(columns={"median_a": "median_a_us", "median_b": "median_b_us"})


def latency_trial_comparisons(
    lat: pd.DataFrame, kernels: Sequence[str], *, rng: np.random.Generator, n_boot: int = N_BOOT
) -> pd.DataFrame:
    """The conservative check: walks within a trial are correlated, so here each trial's
    median walk (µs) is one unit. Needs 2 trials per kernel and row for figures at all, and
    4 to be able to call a difference (see min_attainable_p). Same columns as
    latency_comparisons minus p99, plus min_attainable_p."""
    med = lat.groupby(["trial_id", *LATENCY_KEYS], observed=True)["duration_ns"]
    per_trial = (med.median() / 1e3).rename("median_us").reset_index()
    groups = {
        _key(k): np.sort(g["median_us"].to_numpy())
        for k, g in per_trial.groupby(LATENCY_KEYS, observed=True)
    }
    rows = []
    for cand, ref in _latency_pairs(list(groups), kernels):
        c = compare_samples(groups[cand], groups[ref], n_boot=n_boot, rng=rng)
        rows.append(
            _pair_row(cand, ref)
            | _comparison_row(c)
            | {"min_attainable_p": min_attainable_p(c.n_a, c.n_b)}
        )
    out = _finish_comparisons(rows)
    return out.rename(columns={"median_a": "median_a_us", "median_b": "median_b_us"})


def latency_ecdf(groups: dict[LatencyKey, np.ndarray], points: int = 400) -> pd.DataFrame:
    """ECDF per group at a bounded number of points (dense in the upper tail), so plotting
    10 million walks draws a few hundred vertices per line. duration_us, fraction in 0..1,
    n_walks (the group's walks, which the points no longer show)."""
    body = np.linspace(0.0, 1.0, points)
    frames = []
    for key, x in groups.items():
        n = len(x)
        tail = 1.0 - np.logspace(-1, -max(1.0, min(6.0, math.log10(n))), points // 4)
        frac = np.unique(np.concatenate([body, tail, [1.0 / n, 1.0]]))
        idx = np.clip(np.ceil(frac * n - 1e-9).astype(np.int64) - 1, 0, n - 1)
        frames.append(
            pd.DataFrame(
                _key_row(key)
                | {"duration_us": x[idx] / 1e3, "fraction": (idx + 1) / n, "n_walks": n}
            )
        )
    return pd.concat(frames, ignore_index=True).drop_duplicates()


def _binned_quantiles(bins: np.ndarray, x: np.ndarray, qs: Sequence[float]) -> pd.DataFrame:
    """Per bin (small non-negative ints): n and the q-quantiles of non-negative ints x, from
    one sort of a combined key (bin in the top bits), exact and without a groupby copy."""
    key = np.sort((bins.astype(np.int64) << 57) | np.minimum(x, (1 << 57) - 1))
    kbin = key >> 57
    uniq, start, n = np.unique(kbin, return_index=True, return_counts=True)
    vals = key & ((1 << 57) - 1)
    out: dict[Any, np.ndarray] = {"bin": uniq, "n": n}
    for q in qs:
        rank = np.ceil(q * n - 1e-9).astype(np.int64).clip(1, n)
        out[q] = vals[start + rank - 1]
    return pd.DataFrame(out)


def latency_by_vmas(lat: pd.DataFrame, min_n: int = 20) -> pd.DataFrame | None:
    """Attributed walk time against the target's own VMAs, binned by powers of two: per
    kernel, trigger, method and bin, the median VMA count, n, and the median and p99 walk
    (µs). Unattributed walks have no VMA count and are left out; bins with fewer than
    min_n walks are dropped."""
    known = lat["vmas"].notna().to_numpy()
    if not known.any():
        return None
    lat = lat[known]
    frames = []
    keys = ["kernel", "trigger", "method"]
    for k, idx in lat.groupby(keys, observed=True).indices.items():
        vmas = np.maximum(lat["vmas"].to_numpy(dtype=np.int64)[idx], 0)
        bins = np.floor(np.log2(np.maximum(vmas, 1))).astype(np.int64)
        dur = _binned_quantiles(bins, lat["duration_ns"].to_numpy()[idx], (0.5, 0.99))
        mid = _binned_quantiles(bins, vmas, (0.5,))
        frames.append(
            pd.DataFrame(
                {
                    "kernel": str(k[0]),
                    "trigger": str(k[1]),
                    "method": str(k[2]),
                    "vmas": mid[0.5].astype(float),
                    "n": dur["n"],
                    "median": dur[0.5] / 1e3,
                    "p99": dur[0.99] / 1e3,
                }
            )[dur["n"].to_numpy() >= min_n]
        )
    out = pd.concat(frames, ignore_index=True).melt(
        id_vars=[*keys, "vmas", "n"],
        value_vars=["median", "p99"],
        var_name="statistic",
        value_name="duration_us",
    )
    if out.empty:
        return None
    out["method_label"] = out["method"].map(method_label)
    return out


def analyze_latency(
    run: Run,
    tm: pd.DataFrame,
    kernels: Sequence[str],
    *,
    rng: np.random.Generator,
    n_boot: int = N_BOOT,
    cap: int = CAP,
) -> LatencyAnalysis | None:
    """Every latency table, over walks of successful trials only, one row per trigger and
    workload (unattributed walks in their own rows), and the walk-cost model. The walks
    are read out of core (orchestrator.results.analysis.walks): a row with more than cap
    walks is summarised from a fixed-seed sample of about cap of them.

    Raises UsageError naming the files when the walk table cannot be read."""
    combos = walk_combos(run, set(successful(tm)["trial_id"]))
    if combos is None:
        return None
    w = read_walks(run, combos, cap=cap)
    lat, workloads = w.lat, w.workloads
    groups = _latency_groups(lat)
    lb = lat.groupby(LATENCY_KEYS, observed=True)["lower_bound"].any()
    lower = {_key(k): bool(v) for k, v in lb.items()}
    summary = with_workload_columns(
        latency_summary(groups, lower, rng=rng, n_boot=n_boot, counts=w.counts), workloads
    )
    return LatencyAnalysis(
        n_samples=w.n,
        n_unattributed=w.n_unattributed,
        workloads=workloads,
        summary=summary,
        comparisons=with_workload_columns(
            latency_comparisons(groups, kernels, rng=rng, n_boot=n_boot), workloads
        ),
        trial_comparisons=with_workload_columns(
            latency_trial_comparisons(lat, kernels, rng=rng, n_boot=n_boot), workloads
        ),
        ecdf=latency_ecdf(groups),
        by_vmas=latency_by_vmas(lat),
        walk_cost=walk_cost_model(summary, kernels),
        sampled_rows=len(w.sampled),
        cap=cap,
    )
