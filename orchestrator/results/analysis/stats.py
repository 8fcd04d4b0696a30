"""Analysis of run directories: per-trial KSM metrics, per-phase deltas, latency statistics,
kernel comparisons and run-to-run comparisons. pandas and scipy only: no plotting, and
nothing here touches the host; every result is a pure function of the run directories.

Statistical methods (also printed in every report):
- Quantiles use the "inverted CDF" definition: the ceil(q n)-th smallest value.
- Bootstrap intervals are percentile intervals over N_BOOT replicates. The replicates of a
  quantile are drawn *exactly* as if all n samples were resampled, without materialising
  any resample: the k-th smallest of n values resampled from a sorted sample x is
  x[ceil(n U) - 1] with U ~ Beta(k, n - k + 1), the k-th smallest of n uniforms. So the
  interval of a quantile of 10 million walk times costs one sort plus N_BOOT Beta draws,
  and is the same interval scipy.stats.bootstrap would converge to with that many resamples.
- Walks are read out of core (walks.py). A latency row (kernel, trigger, workload, method)
  of at most WALK_CAP walks is analysed from every walk; a larger row from a uniform
  Bernoulli sample of about WALK_CAP walks, fixed by a hash of each walk's file row and
  SEED. Its n counts every walk, n_sampled the walks kept; its quantiles, intervals, rank
  test, Cliff's delta, per-trial medians, ECDF and VMA bins are the sample's (intervals of
  a sample of that size: wider than every walk would give, never narrower).
- The maximum gets no interval: the bootstrap cannot bound an extreme.
- Kernel differences: ratio of medians with its bootstrap interval, the two-sided
  Mann-Whitney U p-value (scipy) and Cliff's delta from the U statistic,
  delta = 2 U / (n_a n_b) - 1. p-values of one table are Holm-adjusted, and a difference is
  flagged only when the adjusted p < 0.05 *and* the ratio interval excludes 1.
- Across repeats: mean with a Student t interval, and the coefficient of variation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator.results.analysis.common import LEVEL_TOLERANCE, TAIL_MIN

__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "METHOD_NOTES",
    "N_BOOT",
    "SEED",
    "Estimate",
    "SampleComparison",
    "cliffs_delta_from_u",
    "cliffs_magnitude",
    "compare_samples",
    "holm",
    "min_attainable_p",
    "quantile_draws",
    "quantile_interval",
    "quantile_rank",
    "quantile_ratio",
    "repeat_summary",
    "trial_repeats_needed",
]

N_BOOT = 10_000

CONFIDENCE = 0.95

ALPHA = 0.05

WALK_CAP = 1 << 19  # walks kept per latency row (walks.CAP)
SEED = 20_240_611  # fixed, so that a report is a pure function of its run directories

METHOD_NOTES = (
    "Quantiles are the ceil(q n)-th smallest value. Intervals are 95% percentile-bootstrap "
    f"intervals over {N_BOOT:,} replicates, drawn exactly as if every sample were resampled "
    "(the k-th smallest of a resample is x[ceil(n U)], U ~ Beta(k, n - k + 1)).",
    f"Walk tables are read out of core: a latency row of up to {WALK_CAP:,} walks is "
    "analysed from every walk; a larger one from a uniform sample of about "
    f"{WALK_CAP:,} of its walks, fixed by a hash of each walk's file row and seed {SEED} "
    "(n counts every walk, n_sampled those kept): its quantiles, intervals, rank test, "
    "Cliff's delta, ECDF and VMA bins are the sample's, the intervals those of a sample "
    "of that size.",
    "The maximum has no interval: a bootstrap cannot bound an extreme. A quantile with "
    f"fewer than {TAIL_MIN} samples beyond it is marked unreliable.",
    "Kernels are compared with the ratio of medians (and of p99 for walk times) with its "
    "bootstrap interval, the two-sided Mann-Whitney U p-value, Holm-adjusted within each "
    "table, and Cliff's delta from the U statistic (|δ| < 0.147 negligible, < 0.33 small, "
    "< 0.474 medium, else large). A difference is called only when the adjusted p < 0.05 "
    "and the interval excludes 1.",
    "Walks within one trial are correlated, so the pooled-walk intervals and p-values are "
    "optimistic, and with millions of walks any difference is 'significant': read the "
    "ratio and effect size, and the trial-level table where each trial's median walk is "
    "one unit.",
    "Across repeats: mean with a Student t 95% interval; CV = standard deviation / mean.",
    "Walk times marked 'lower-bound proxy' come from the span of tracepoint events and "
    "under-read the walk (shown with ≥); they are only compared with walks timed the same way.",
    "Failed, canceled and timed-out trials are listed but left out of every statistic.",
    "Walks are never pooled over workloads: every latency row is one trigger and one "
    "workload, the walked page's owner described by its kind (guest, host-process, "
    "host-copy), pattern, own mergeable-VMA count and mappings per KSM page (counts within "
    f"{LEVEL_TOLERANCE:.0%} are one row). Walks that could not be attributed stand in "
    "their own 'unattributed' row, under no VMA count.",
    "The trial-level comparison needs 2 successful trials per kernel and row for figures, "
    "and enough to reach p < 0.05 after Holm: the exact Mann-Whitney p of n against n "
    "trials cannot fall below 2 / C(2n, n) (3 a side: 0.1; 4: 0.029; 5: 0.0079).",
)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval (NaN bounds: no interval)."""

    value: float
    lo: float = math.nan
    hi: float = math.nan

    @property
    def excludes_one(self) -> bool:
        return bool(self.lo > 1 or self.hi < 1)


def quantile_rank(q: float, n: int) -> int:
    """1-based rank of the q-quantile of n values ("inverted CDF": ceil(q n), in 1..n)."""
    return min(max(math.ceil(q * n - 1e-9), 1), n)


def quantile_draws(
    x_sorted: np.ndarray, q: float, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """n_boot bootstrap replicates of the q-quantile of x_sorted (ascending), drawn exactly
    as if all n values were resampled with replacement (see the module docstring).
    """
    n = len(x_sorted)
    k = quantile_rank(q, n)
    u = rng.beta(k, n - k + 1, size=n_boot)
    idx = np.clip(np.ceil(u * n).astype(np.int64) - 1, 0, n - 1)
    return x_sorted[idx]


def quantile_interval(
    x_sorted: np.ndarray,
    q: float,
    *,
    n_boot: int = N_BOOT,
    rng: np.random.Generator,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """The q-quantile of x_sorted (ascending) with its percentile-bootstrap interval."""
    if len(x_sorted) == 0:
        return Estimate(math.nan)
    value = float(x_sorted[quantile_rank(q, len(x_sorted)) - 1])
    draws = quantile_draws(x_sorted, q, n_boot, rng)
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(value, float(lo), float(hi))


def quantile_ratio(
    a_sorted: np.ndarray,
    b_sorted: np.ndarray,
    q: float = 0.5,
    *,
    n_boot: int = N_BOOT,
    rng: np.random.Generator,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """q-quantile of a over the q-quantile of b (independent samples, both ascending), with
    a percentile-bootstrap interval. NaN when either sample is empty or b's quantile is 0.
    """
    if len(a_sorted) == 0 or len(b_sorted) == 0:
        return Estimate(math.nan)
    qa = a_sorted[quantile_rank(q, len(a_sorted)) - 1]
    qb = b_sorted[quantile_rank(q, len(b_sorted)) - 1]
    if qb == 0:
        return Estimate(math.nan)
    da = quantile_draws(a_sorted, q, n_boot, rng).astype(float)
    db = quantile_draws(b_sorted, q, n_boot, rng).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = da / db
    lo, hi = np.quantile(ratios, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(float(qa / qb), float(lo), float(hi))


def cliffs_delta_from_u(u_a: float, n_a: int, n_b: int) -> float:
    """Cliff's delta P(a > b) - P(a < b) from the Mann-Whitney U of a (ties count half)."""
    return 2.0 * u_a / (n_a * n_b) - 1.0


def cliffs_magnitude(delta: float) -> str:
    """Romano et al. (2006) thresholds: negligible < 0.147 <= small < 0.33 <= medium < 0.474."""
    if math.isnan(delta):
        return "n/a"
    d = abs(delta)
    for limit, label in ((0.147, "negligible"), (0.33, "small"), (0.474, "medium")):
        if d < limit:
            return label
    return "large"


@dataclass(frozen=True)
class SampleComparison:
    """Sample a against sample b: ratio of medians a/b, Mann-Whitney U and Cliff's delta."""

    n_a: int
    n_b: int
    median_a: float
    median_b: float
    ratio: Estimate
    p_value: float
    cliffs_delta: float

    @property
    def magnitude(self) -> str:
        return cliffs_magnitude(self.cliffs_delta)

    def significant(self, alpha: float = ALPHA, p_value: float | None = None) -> bool:
        """Flag a difference only when the rank test (p, or an adjusted p) and the
        bootstrap interval of the ratio agree; NaN is never significant."""
        p = self.p_value if p_value is None else p_value
        return bool(p < alpha and self.ratio.excludes_one)


def compare_samples(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = N_BOOT,
    rng: np.random.Generator,
    confidence: float = CONFIDENCE,
) -> SampleComparison:
    """Compare two independent samples (any order; NaN dropped). Fewer than 2 values on a
    side gives NaN statistics rather than a misleading number."""
    a = np.sort(np.asarray(a)[~pd.isna(a)])
    b = np.sort(np.asarray(b)[~pd.isna(b)])
    n_a, n_b = len(a), len(b)
    med_a = float(a[quantile_rank(0.5, n_a) - 1]) if n_a else math.nan
    med_b = float(b[quantile_rank(0.5, n_b) - 1]) if n_b else math.nan
    if min(n_a, n_b) < 2:
        return SampleComparison(n_a, n_b, med_a, med_b, Estimate(math.nan), math.nan, math.nan)
    ratio = quantile_ratio(a, b, 0.5, n_boot=n_boot, rng=rng, confidence=confidence)
    if np.ptp(np.concatenate([a[[0, -1]], b[[0, -1]]])) == 0:  # all values equal
        return SampleComparison(n_a, n_b, med_a, med_b, ratio, 1.0, 0.0)
    mwu = stats.mannwhitneyu(a, b, alternative="two-sided", method="auto")
    delta = cliffs_delta_from_u(float(mwu.statistic), n_a, n_b)
    return SampleComparison(n_a, n_b, med_a, med_b, ratio, float(mwu.pvalue), delta)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok])
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[ok][order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    out[ok] = adjusted
    return out


def repeat_summary(
    df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Across repeats: per group and metric, n, mean with a Student t interval, standard
    deviation and coefficient of variation (sd / mean; NaN when the mean is 0). Units are
    those of each metric. Long form: by..., metric, n, mean, ci_lo, ci_hi, sd, cv.
    """
    present = [m for m in metrics if m in df.columns]
    long = df.melt(id_vars=list(by), value_vars=present, var_name="metric").dropna(subset=["value"])
    long["value"] = long["value"].astype(float)
    out = long.groupby([*by, "metric"], sort=False)["value"].agg(n="count", mean="mean", sd="std")
    out = out.reset_index()
    n = out["n"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_crit = np.where(n >= 2, stats.t.ppf((1 + confidence) / 2, np.maximum(n - 1, 1)), np.nan)
        half = t_crit * out["sd"].to_numpy() / np.sqrt(n)
        mean = out["mean"].to_numpy()
        out["cv"] = np.where(mean != 0, out["sd"].to_numpy() / np.abs(mean), np.nan)
    out["ci_lo"], out["ci_hi"] = mean - half, mean + half
    order = {m: i for i, m in enumerate(present)}
    out = out.sort_values([*by, "metric"], key=lambda s: s.map(order) if s.name == "metric" else s)
    return out[[*by, "metric", "n", "mean", "ci_lo", "ci_hi", "sd", "cv"]].reset_index(drop=True)


def _comparison_row(c: SampleComparison) -> dict[str, Any]:
    return {
        "n_a": c.n_a,
        "n_b": c.n_b,
        "median_a": c.median_a,
        "median_b": c.median_b,
        "ratio": c.ratio.value,
        "ratio_lo": c.ratio.lo,
        "ratio_hi": c.ratio.hi,
        "p_value": c.p_value,
        "cliffs_delta": c.cliffs_delta,
        "magnitude": c.magnitude,
        "_cmp": c,
    }


def _finish_comparisons(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Holm-adjust the p-values of one table and flag significant differences."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["p_holm"] = holm(df["p_value"].to_numpy(dtype=float))
    df["significant"] = [
        c.significant(p_value=p) for c, p in zip(df["_cmp"], df["p_holm"], strict=True)
    ]
    return df.drop(columns="_cmp")


def min_attainable_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided exact Mann-Whitney p-value of n_a against n_b values without
    ties, 2 / C(n_a + n_b, n_a): with 3 trials a side it is 0.1, so no difference can be
    called at 0.05 however large; 4 a side gives 0.029, 5 a side 0.0079."""
    if min(n_a, n_b) < 1:
        return math.nan
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


def trial_repeats_needed(rows: int, alpha: float = ALPHA) -> int:
    """Trials per kernel and row the trial-level comparison needs before its smallest
    attainable p, Holm-adjusted over `rows` rows, can fall below alpha."""
    n = 2
    while min_attainable_p(n, n) * max(rows, 1) >= alpha:
        n += 1
    return n
