"""Run B against run A (the baseline) of the same spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.errors import UsageError
from orchestrator.results.analysis.common import TRIAL_METRICS, method_label
from orchestrator.results.analysis.hygiene import (
    _manifest_warnings,
    _mismatch_warnings,
    _trial_warnings,
)
from orchestrator.results.analysis.labels import _level_maps
from orchestrator.results.analysis.latency import _latency_groups, with_workload_columns
from orchestrator.results.analysis.load import Run, load_run
from orchestrator.results.analysis.metrics import (
    _metric_values,
    kernel_order,
    successful,
    trial_metrics,
)
from orchestrator.results.analysis.stats import (
    N_BOOT,
    SEED,
    _comparison_row,
    _finish_comparisons,
    compare_samples,
    quantile_ratio,
)
from orchestrator.results.analysis.walks import read_walks, walk_combos

__all__ = ["ComparisonResult", "compare_runs"]


@dataclass(frozen=True)
class ComparisonResult:
    """Run B against run A (the baseline): ratios are B / A."""

    run_a: str
    run_b: str
    spec_name: str
    pairs: list[tuple[str, str]]  # (kernel in A, kernel in B)
    metrics: pd.DataFrame  # kernel_a, kernel_b, fleet_size, metric, n_a, ..., significant
    latency: pd.DataFrame | None  # kernel_a, kernel_b, trigger, method, ...
    warnings: list[str] = field(default_factory=list)


def _kernel_pairs(ka: list[str], kb: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Same labels pair up; two single-kernel runs pair with each other (an A/B of kernels)."""
    common = [k for k in ka if k in kb]
    if common:
        only = [
            f"kernel {k} only in run {side}"
            for side, ks, other in (("A", ka, kb), ("B", kb, ka))
            for k in ks
            if k not in other
        ]
        return [(k, k) for k in common], only
    if len(ka) == 1 and len(kb) == 1:
        return [(ka[0], kb[0])], []
    return [], [f"no kernel in common (A: {', '.join(ka)}; B: {', '.join(kb)})"]


def _run_metric_rows(
    tma: pd.DataFrame,
    tmb: pd.DataFrame,
    pairs: list[tuple[str, str]],
    rng: np.random.Generator,
    n_boot: int,
) -> list[dict[str, Any]]:
    rows = []
    a_ok, b_ok = successful(tma), successful(tmb)
    for ka, kb in pairs:
        fa, fb = a_ok[a_ok["kernel"] == ka], b_ok[b_ok["kernel"] == kb]
        for fleet in sorted(set(fa["fleet_size"]) & set(fb["fleet_size"])):
            xa, xb = fa[fa["fleet_size"] == fleet], fb[fb["fleet_size"] == fleet]
            for metric in TRIAL_METRICS:
                va, vb = _metric_values(xa, metric), _metric_values(xb, metric)
                if len(va) == 0 and len(vb) == 0:
                    continue
                # compare_samples(a, b) gives a / b: pass B first for "B relative to A".
                c = compare_samples(vb, va, n_boot=n_boot, rng=rng)
                row = _comparison_row(c)
                row = row | {
                    "n_a": c.n_b,
                    "n_b": c.n_a,
                    "median_a": c.median_b,
                    "median_b": c.median_a,
                    "cliffs_delta": c.cliffs_delta,
                }
                rows.append(
                    {"kernel_a": ka, "kernel_b": kb, "fleet_size": fleet, "metric": metric} | row
                )
    return rows


def _run_latency_rows(
    ra: Run,
    rb: Run,
    tma: pd.DataFrame,
    tmb: pd.DataFrame,
    pairs: list[tuple[str, str]],
    rng: np.random.Generator,
    n_boot: int,
) -> pd.DataFrame | None:
    ca = walk_combos(ra, set(successful(tma)["trial_id"]))
    cb = walk_combos(rb, set(successful(tmb)["trial_id"]))
    if ca is None or cb is None:
        return None
    levels = _level_maps([ca, cb])  # shared, so that a workload row is the same in both
    wa, wb = read_walks(ra, ca, levels), read_walks(rb, cb, levels)
    ga, gb = _latency_groups(wa.lat), _latency_groups(wb.lat)
    rows = []
    for ka, kb in pairs:
        for key, a in ga.items():
            kb_key = key._replace(kernel=kb)
            b = gb.get(kb_key)
            if key.kernel != ka or b is None:
                continue
            c = compare_samples(b, a, n_boot=n_boot, rng=rng)
            p99 = quantile_ratio(b, a, 0.99, n_boot=n_boot, rng=rng)
            rows.append(
                {
                    "kernel_a": ka,
                    "kernel_b": kb,
                    "trigger": key.trigger,
                    "workload": key.workload,
                    "method": key.method,
                    "method_label": method_label(key.method),
                    "n_a": wa.counts.get(key, c.n_b),  # every walk; statistics: walks.py
                    "n_b": wb.counts.get(kb_key, c.n_a),
                    "median_a_us": c.median_b / 1e3,
                    "median_b_us": c.median_a / 1e3,
                    "_cmp": c,
                    "ratio": c.ratio.value,
                    "ratio_lo": c.ratio.lo,
                    "ratio_hi": c.ratio.hi,
                    "p_value": c.p_value,
                    "cliffs_delta": c.cliffs_delta,
                    "magnitude": c.magnitude,
                    "p99_ratio": p99.value,
                    "p99_ratio_lo": p99.lo,
                    "p99_ratio_hi": p99.hi,
                }
            )
    workloads = pd.concat([wa.workloads, wb.workloads])
    workloads = workloads[~workloads.index.duplicated()]
    return with_workload_columns(_finish_comparisons(rows), workloads)


def compare_runs(
    run_a: Path | str, run_b: Path | str, *, n_boot: int = N_BOOT, seed: int = SEED
) -> ComparisonResult:
    """Compare run B with run A (baseline) of the same spec: per kernel pair, fleet size and
    metric, the ratio of medians B/A with its interval, Mann-Whitney p (Holm) and Cliff's
    delta (positive: B larger); the same for latency per trigger and method.

    Raises UsageError when either directory is not a run, or the spec names differ.
    """
    ra, rb = load_run(run_a), load_run(run_b)
    if ra.spec_name != rb.spec_name:
        raise UsageError(
            f"{run_a} (spec {ra.spec_name!r}) and {run_b} (spec {rb.spec_name!r}) ran different "
            "specs; compare runs of the same spec, or put both in one report"
        )
    rng = np.random.default_rng(seed)
    tma, tmb = trial_metrics(ra), trial_metrics(rb)
    pairs, pair_notes = _kernel_pairs(kernel_order(ra), kernel_order(rb))
    metrics = _finish_comparisons(_run_metric_rows(tma, tmb, pairs, rng, n_boot))
    latency = _run_latency_rows(ra, rb, tma, tmb, pairs, rng, n_boot)
    warnings = pair_notes + _mismatch_warnings([ra.manifest, rb.manifest])
    for side, run, tm in (("A", ra, tma), ("B", rb, tmb)):
        # Manifest warnings already start with the run id; trial warnings get the side.
        warnings += _manifest_warnings([run.manifest])
        warnings += [f"run {side} ({run.run_id}): {w}" for w in _trial_warnings(tm)]
    return ComparisonResult(
        ra.run_id, rb.run_id, ra.spec_name or "", pairs, metrics, latency, warnings
    )
