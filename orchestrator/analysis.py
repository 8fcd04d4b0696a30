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
- The maximum gets no interval: the bootstrap cannot bound an extreme.
- Kernel differences: ratio of medians with its bootstrap interval, the two-sided
  Mann-Whitney U p-value (scipy) and Cliff's delta from the U statistic,
  delta = 2 U / (n_a n_b) - 1. p-values of one table are Holm-adjusted, and a difference is
  flagged only when the adjusted p < 0.05 *and* the ratio interval excludes 1.
- Across repeats: mean with a Student t interval, and the coefficient of variation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from orchestrator.errors import UsageError
from orchestrator.walkcost import WalkCost, is_rmap_bench, published_comparison, walk_cost_model

log = logging.getLogger(__name__)

N_BOOT = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05
SEED = 20_240_611  # fixed, so that a report is a pure function of its run directories
PAGE_BYTES_DEFAULT = 4096
MIB = 1 << 20
# "attribute" (the runner scrambles the workload to see which saving was its own) follows
# hold when the spec enables it.
PHASES = (
    "boot",
    "baseline",
    "fill",
    "merge",
    "hold",
    "attribute",
    "reclaim",
    "migrate",
    "teardown",
)
SETTLE_PHASES = PHASES[:5]  # boot..hold: before anything disturbs the merged state
LATENCY_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999}
TAIL_MIN = 10  # fewer samples than this beyond a quantile: its interval is unreliable
METHOD_LABELS = {
    "bpf-fentry": "BPF fentry/fexit",
    "kprobe": "kprobe pair",
    "tracepoint-proxy": "lower-bound proxy",
}
TABLE_FILES = {
    "trials": "trials.parquet",
    "ksm": "ksm_samples.parquet",
    "vmstat": "vmstat_samples.parquet",
    "processes": "process_samples.parquet",
    "guests": "guests.parquet",
    "events": "events.parquet",
    "latency": "latency.parquet",
    "phase_deltas": "phase_deltas.parquet",
}
REQUIRED_COLUMNS = {
    "trials": ("trial_id", "kernel", "fleet_size", "status"),
    "ksm": ("trial_id", "phase", "t_s", "pages_sharing"),
    "vmstat": ("trial_id", "phase", "ts_ns", "counter", "value"),
    "processes": ("trial_id", "guest"),
    "guests": ("trial_id", "guest"),
    "events": ("trial_id", "event"),
    "latency": ("trial_id", "kernel", "trigger", "method", "duration_ns"),
    "phase_deltas": ("trial_id", "phase", "counter", "delta"),
}
OPTIONAL_TRIAL_COLUMNS = (
    "repeat",
    "reason",
    "accel",
    "kernel_release",
    "guest_memory_mib",
    "workload_mib",
    "settled",
    "settle_s",
    "general_profit_mib",
    "measured_saving_mib",
    "pages_sharing",
    "ksmd_cpu_s",
    "started_ns",
    "mappings_per_ksm_page",
)
KSM_DELTA_COLUMNS = (
    "full_scans",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "general_profit_bytes",
    "ksm_zero_pages",
    "ksmd_cpu_s",
)
# Per-trial metrics: column -> label with its unit.
TRIAL_METRICS = {
    "settle_s": "time to settle (s)",
    "t50_s": "time to 50% of final sharing (s)",
    "t90_s": "time to 90% of final sharing (s)",
    "merge_rate_50_pages_per_s": "merge rate to 50% (pages/s)",
    "merge_rate_90_pages_per_s": "merge rate to 90% (pages/s)",
    "saved_profit_mib": "saved, general_profit (MiB)",
    "saved_sharing_mib": "saved, pages_sharing x page size (MiB)",
    "measured_saving_mib": "saved, attributed to the workload by the runner (MiB)",
    "scramble_saving_mib": "saved, attributed by the scramble's difference (MiB)",
    "saved_per_guest_mib": "saved per guest, general_profit (MiB)",
    "ksmd_cpu_s": "ksmd CPU (s)",
    "ksmd_cpu_s_per_gib": "ksmd CPU per GiB saved (s/GiB)",
    "fill_s_median": "guest fill time, median guest (s)",
    "fill_s_max": "guest fill time, slowest guest (s)",
    "mappings_per_ksm_page": "mappings per KSM page at the end of merge (count)",
}


LEVEL_TOLERANCE = 0.05  # counts within 5% of a level's smallest are one level


METHOD_NOTES = (
    "Quantiles are the ceil(q n)-th smallest value. Intervals are 95% percentile-bootstrap "
    f"intervals over {N_BOOT:,} replicates, drawn exactly as if every sample were resampled "
    "(the k-th smallest of a resample is x[ceil(n U)], U ~ Beta(k, n - k + 1)): no "
    "subsampling, however many walks were recorded.",
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


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Run:
    """One run directory: its manifest and tables (None: not recorded in this run)."""

    run_dir: Path
    manifest: dict[str, Any]
    trials: pd.DataFrame
    ksm: pd.DataFrame | None = None
    vmstat: pd.DataFrame | None = None
    processes: pd.DataFrame | None = None
    guests: pd.DataFrame | None = None
    events: pd.DataFrame | None = None
    latency: pd.DataFrame | None = None
    phase_deltas: pd.DataFrame | None = None

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.run_dir.name)

    @property
    def spec_name(self) -> str | None:
        name = self.manifest.get("spec_name")
        return None if name is None else str(name)

    @property
    def manifests(self) -> list[dict[str, Any]]:
        """The manifests behind this Run (several when runs were combined)."""
        return list(self.manifest.get("combined_from") or [self.manifest])


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    from orchestrator.manifest import load_manifest  # validated: one line, never a traceback

    return load_manifest(run_dir)


def _read_table(path: Path, name: str) -> pd.DataFrame:
    """Read one parquet table; string columns of sample tables become categoricals.

    Raises UsageError naming the file when it cannot be read or lacks required columns.
    """
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        strings = [f.name for f in schema if pa.types.is_string(f.type)]
        strings += [f.name for f in schema if pa.types.is_large_string(f.type)]
        if name != "trials":
            pf = pq.ParquetFile(path, read_dictionary=strings)
        # One column at a time: the Arrow copy of a column is freed before the next is
        # read, so peak memory stays near the DataFrame's own size (10M walks: ~0.5 GiB,
        # against ~1.2 GiB for read_table().to_pandas()).
        columns = {c: pf.read(columns=[c]).column(0).to_pandas() for c in schema.names}
        df = pd.DataFrame(columns, copy=False)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"{path}: cannot read table: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in df.columns]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _normalise_trials(trials: pd.DataFrame, run_id: str) -> pd.DataFrame:
    trials = trials.copy()
    for col in OPTIONAL_TRIAL_COLUMNS:
        if col not in trials.columns:
            trials[col] = pd.NA if col in ("reason", "accel", "kernel_release") else np.nan
    trials["trial_id"] = trials["trial_id"].astype(str)
    trials["kernel"] = trials["kernel"].astype(str)
    trials["status"] = trials["status"].astype(str)
    trials["run_id"] = run_id
    return trials


def load_run(run_dir: Path | str) -> Run:
    """Load a run directory (results/<run_id>/). Only manifest.json and trials.parquet
    are required; a missing optional table becomes None.

    Raises UsageError naming the file when the manifest or trials table is missing or
    unreadable, or a table lacks a required column.
    """
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    trials_path = run_dir / TABLE_FILES["trials"]
    if not trials_path.is_file():
        raise UsageError(f"{trials_path}: missing; every run directory has a trials table")
    run_id = str(manifest.get("run_id") or run_dir.name)
    tables: dict[str, pd.DataFrame | None] = {}
    for name, file in TABLE_FILES.items():
        path = run_dir / file
        tables[name] = _read_table(path, name) if path.is_file() else None
    trials_table = tables.pop("trials")
    assert trials_table is not None  # checked above
    trials = _normalise_trials(trials_table, run_id)
    latency = tables.get("latency")
    if latency is not None:
        if "lower_bound" not in latency.columns:
            latency["lower_bound"] = _isin(latency["method"], {"tracepoint-proxy"})
        tables["latency"] = normalise_latency(latency)
    return Run(run_dir=run_dir, manifest=manifest, trials=trials, **tables)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables, keeping categorical columns categorical (union of categories)."""
    cats = {c for f in frames for c in f.columns if isinstance(f[c].dtype, pd.CategoricalDtype)}
    for col in cats:
        union = pd.Index(sorted({v for f in frames if col in f for v in _categories(f[col])}))
        frames = [f.assign(**{col: f[col].astype(pd.CategoricalDtype(union))}) for f in frames]
    return pd.concat(frames, ignore_index=True)


def _categories(s: pd.Series) -> list[str]:
    if isinstance(s.dtype, pd.CategoricalDtype):
        return [str(c) for c in s.cat.categories]
    return [str(v) for v in s.unique()]


def _prefix_trials(df: pd.DataFrame | None, prefix: str) -> pd.DataFrame | None:
    if df is None:
        return None
    if isinstance(df["trial_id"].dtype, pd.CategoricalDtype):
        cats = [prefix + str(c) for c in df["trial_id"].cat.categories]
        return df.assign(trial_id=df["trial_id"].cat.rename_categories(cats))
    return df.assign(trial_id=prefix + df["trial_id"].astype(str))


def combine_runs(runs: Sequence[Run]) -> Run:
    """One Run holding the tables of several runs. Trial ids that collide between runs are
    prefixed with "<run_id>/"; manifest["combined_from"] keeps every manifest.
    """
    if not runs:
        raise UsageError("no run directories given")
    if len(runs) == 1:
        return runs[0]
    ids = [set(r.trials["trial_id"]) for r in runs]
    clash = len(set().union(*ids)) < sum(len(i) for i in ids)
    tables: dict[str, pd.DataFrame | None] = {}
    for name in TABLE_FILES:
        frames = [getattr(r, name) for r in runs]
        if clash:
            frames = [_prefix_trials(f, f"{r.run_id}/") for f, r in zip(frames, runs, strict=True)]
        present = [f for f in frames if f is not None]
        tables[name] = _concat(present) if present else None
    names = {r.spec_name for r in runs}
    manifest = {
        "run_id": "+".join(r.run_id for r in runs),
        "spec_name": names.pop() if len(names) == 1 else None,
        "combined_from": [m for r in runs for m in r.manifests],
    }
    trials = tables.pop("trials")
    assert trials is not None  # every run has one
    return Run(run_dir=runs[0].run_dir, manifest=manifest, trials=trials, **tables)


# --------------------------------------------------------------------------- statistics


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


# --------------------------------------------------------------------------- per trial


def _page_bytes(run: Run) -> int:
    host = run.manifests[0].get("host") or {}
    return int(host.get("page_size_bytes") or host.get("page_size") or PAGE_BYTES_DEFAULT)


def _ksm_frame(ksm: pd.DataFrame, settle_only: bool) -> tuple[pd.DataFrame, pd.Index]:
    """KSM samples keyed by integer trial codes (no per-row strings: 1M samples stay cheap),
    sorted by trial and time; with the trial labels to map the codes back."""
    codes, labels = _codes(ksm["trial_id"])
    keep = ksm["phase"].isin(SETTLE_PHASES).to_numpy() if settle_only else slice(None)
    df = pd.DataFrame(
        {
            "tid": codes[keep],
            "t_s": ksm["t_s"].to_numpy(dtype=float)[keep],
            "ps": ksm["pages_sharing"].to_numpy(dtype=float)[keep],
            "merge": (ksm["phase"] == "merge").to_numpy()[keep],
        }
    )
    for col in ("general_profit_bytes", "ksmd_cpu_s"):
        if col in ksm.columns:
            df[col] = ksm[col].to_numpy(dtype=float)[keep]
    return df.sort_values(["tid", "t_s"], kind="stable"), labels


def _by_trial(df: pd.DataFrame, labels: pd.Index) -> pd.DataFrame:
    """A per-trial-code frame re-indexed by trial label, as a trial_id column."""
    df.index = labels[df.index.to_numpy()]
    return df.rename_axis("trial_id").reset_index()


def merge_milestones(ksm: pd.DataFrame) -> pd.DataFrame:
    """Per trial, from KSM samples of the phases up to hold: the final pages_sharing, seconds
    from merge start (first 'merge' sample, else the first sample) to 50% and 90% of it,
    and the merge rate to each, (gain in pages_sharing) / (seconds), in pages/s.
    """
    df, labels = _ksm_frame(ksm, settle_only=True)
    g = df.groupby("tid", sort=False)
    t0 = df["t_s"].where(df["merge"]).groupby(df["tid"], sort=False).transform("min")
    t0 = t0.fillna(g["t_s"].transform("min"))
    after = df[df["t_s"] >= t0].assign(t0=t0)
    ga = after.groupby("tid", sort=True)
    out = pd.DataFrame({"final_pages_sharing": ga["ps"].last(), "t0_s": ga["t0"].first()})
    ps0 = ga["ps"].first()
    for pct in (50, 90):
        target = after["tid"].map(out["final_pages_sharing"] * pct / 100)
        reached = after[(after["ps"] >= target) & (target > 0)].groupby("tid")
        t_hit = reached["t_s"].first().reindex(out.index)
        secs = t_hit - out["t0_s"]
        gain = reached["ps"].first().reindex(out.index) - ps0
        out[f"t{pct}_s"] = secs
        out[f"merge_rate_{pct}_pages_per_s"] = (gain / secs).where(secs > 0)
    return _by_trial(out, labels)


def _ksm_finals(ksm: pd.DataFrame, page_bytes: int) -> pd.DataFrame:
    """Per trial from samples: MiB saved at the last sample up to hold, ksmd CPU-s used."""
    settled, labels = _ksm_frame(ksm, settle_only=True)
    last = settled.groupby("tid").last()
    out = pd.DataFrame({"ksm_sharing_mib": last["ps"] * page_bytes / MIB})
    if "general_profit_bytes" in last:
        out["ksm_profit_mib"] = last["general_profit_bytes"] / MIB
    if "ksmd_cpu_s" in ksm.columns:
        codes, _ = _codes(ksm["trial_id"])
        cpu = pd.Series(ksm["ksmd_cpu_s"].to_numpy(dtype=float)).groupby(codes)
        out = out.join((cpu.max() - cpu.min()).rename("ksm_cpu_s"), how="outer")
    return _by_trial(out, labels)


def _fill_times(guests: pd.DataFrame) -> pd.DataFrame:
    if "fill_s" not in guests.columns:
        return pd.DataFrame(columns=["trial_id", "fill_s_median", "fill_s_max"])
    g = guests.assign(tid=guests["trial_id"].astype(str)).groupby("tid")["fill_s"]
    out = pd.DataFrame({"fill_s_median": g.median(), "fill_s_max": g.max()})
    return out.rename_axis("trial_id").reset_index()


def attributed_saving(trials: pd.DataFrame) -> pd.Series:
    """The workload's saving per trial (MiB): counted page by page where the run did
    (orchestrator.pagecount, column pagecount_saving_mib), else the runner's difference
    (the scramble's, or the idle baseline's)."""
    diff = trials["measured_saving_mib"].astype(float)
    if "pagecount_saving_mib" not in trials:
        return diff
    return trials["pagecount_saving_mib"].astype(float).fillna(diff)


def saving_methods(trials: pd.DataFrame) -> pd.Series:
    """How attributed_saving got each trial's figure: "pagemap" or "difference"."""
    if "saving_method" not in trials:
        return pd.Series("difference", index=trials.index)
    return trials["saving_method"].fillna("difference").astype(str)


def trial_metrics(run: Run) -> pd.DataFrame:
    """One row per trial (every status) with the metrics of TRIAL_METRICS, in their units.
    Values the runner recorded in trials.parquet win; samples fill what it left empty."""
    page_bytes = _page_bytes(run)
    keys = [
        "run_id",
        "trial_id",
        "kernel",
        "kernel_release",
        "fleet_size",
        "repeat",
        "status",
        "reason",
        "accel",
        "guest_memory_mib",
        "workload_mib",
        "settled",
        "settle_s",
        "started_ns",
    ]
    tm = run.trials[keys].copy()
    tm["saved_profit_mib"] = run.trials["general_profit_mib"].astype(float)
    sharing = pd.to_numeric(run.trials["pages_sharing"], errors="coerce").astype(float)
    tm["saved_sharing_mib"] = sharing * page_bytes / MIB
    tm["ksmd_cpu_s"] = run.trials["ksmd_cpu_s"].astype(float)
    tm["measured_saving_mib"] = attributed_saving(run.trials)
    tm["scramble_saving_mib"] = run.trials["measured_saving_mib"].astype(float)
    tm["saving_method"] = saving_methods(run.trials)
    tm["mappings_per_ksm_page"] = run.trials["mappings_per_ksm_page"].astype(float)
    if run.ksm is not None and len(run.ksm):
        tm = tm.merge(merge_milestones(run.ksm), on="trial_id", how="left")
        fin = _ksm_finals(run.ksm, page_bytes)
        tm = tm.merge(fin, on="trial_id", how="left")
        for col, src in (
            ("saved_profit_mib", "ksm_profit_mib"),
            ("saved_sharing_mib", "ksm_sharing_mib"),
            ("ksmd_cpu_s", "ksm_cpu_s"),
        ):
            if src in tm:
                tm[col] = tm[col].fillna(tm[src])
        tm = tm.drop(columns=[c for c in fin.columns if c != "trial_id"])
    if run.guests is not None:
        tm = tm.merge(_fill_times(run.guests), on="trial_id", how="left")
    fleet = tm["fleet_size"].astype(float)
    failed = tm["status"] != "successful"
    for col in (
        "saved_profit_mib",
        "saved_sharing_mib",
        "measured_saving_mib",
        "scramble_saving_mib",
        "mappings_per_ksm_page",
        "ksmd_cpu_s",
        "fill_s_median",
        "fill_s_max",
        *[c for c in tm if c.startswith(("t50", "t90", "merge_rate"))],
    ):
        if col in tm:  # a trial that did not succeed has no result, not a zero
            tm.loc[failed, col] = np.nan
    tm["saved_per_guest_mib"] = tm["saved_profit_mib"] / fleet.where(fleet > 0)
    gib = tm["saved_profit_mib"] / 1024
    tm["ksmd_cpu_s_per_gib"] = tm["ksmd_cpu_s"] / gib.where(gib > 0)
    for col in TRIAL_METRICS:
        if col not in tm.columns:
            tm[col] = np.nan
    return tm


def successful(tm: pd.DataFrame) -> pd.DataFrame:
    """The trials that count in statistics: status "successful"."""
    return tm[tm["status"] == "successful"]


def kernel_order(run: Run) -> list[str]:
    """Kernel labels, reference first: the manifests' kernels order, then the trials'."""
    names = [str(k.get("name")) for m in run.manifests for k in (m.get("kernels") or [])]
    names += [str(k) for k in run.trials["kernel"]]
    present = set(run.trials["kernel"].astype(str))
    return [k for k in dict.fromkeys(names) if k in present]


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


def _metric_values(df: pd.DataFrame, metric: str) -> np.ndarray:
    return np.asarray(df[metric].astype(float).dropna().to_numpy(), dtype=float)


def kernel_comparisons(
    tm: pd.DataFrame, kernels: Sequence[str], *, n_boot: int = N_BOOT, rng: np.random.Generator
) -> pd.DataFrame:
    """Per fleet size and metric, each kernel (a) against the reference kernels[0] (b), with
    successful trials as the units. Columns: fleet_size, metric, kernel_a, kernel_b, then
    those of SampleComparison plus p_holm and significant."""
    ok = successful(tm)
    rows = []
    for fleet, grp in ok.groupby("fleet_size", sort=True):
        ref = grp[grp["kernel"] == kernels[0]]
        for kernel in kernels[1:]:
            cand = grp[grp["kernel"] == kernel]
            if cand.empty or ref.empty:
                continue
            for metric in TRIAL_METRICS:
                a, b = _metric_values(cand, metric), _metric_values(ref, metric)
                if len(a) == 0 and len(b) == 0:
                    continue
                c = compare_samples(a, b, n_boot=n_boot, rng=rng)
                keys = {
                    "fleet_size": fleet,
                    "metric": metric,
                    "kernel_a": kernel,
                    "kernel_b": kernels[0],
                }
                rows.append(keys | _comparison_row(c))
    return _finish_comparisons(rows)


# --------------------------------------------------------------------------- phases


def _codes(s: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Integer codes and their labels (as strings) of a categorical or plain column."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy(), pd.Index(s.cat.categories.astype(str))
    codes, labels = pd.factorize(s.astype(str))
    return codes, pd.Index(labels)


def _isin(s: pd.Series, values: set[str]) -> np.ndarray:
    """Boolean mask: s (categorical or not) as a string is in values. On a categorical it
    tests the categories, not the rows: no string per row for 10 million walks."""
    codes, labels = _codes(s)
    keep = np.append(labels.isin(list(values)), False)  # code -1 (missing) -> False
    return np.asarray(keep[codes], dtype=bool)


def _vmstat_phase_deltas(v: pd.DataFrame) -> pd.DataFrame:
    """Changes of each cumulative counter between consecutive samples of a trial, summed
    per phase: a change belongs to the phase of the later sample, so nothing is lost at a
    phase boundary. Works on code arrays (one sort, no copies of the long table)."""
    (trial, trials), (counter, counters) = _codes(v["trial_id"]), _codes(v["counter"])
    phase, phases = _codes(v["phase"])
    order = np.lexsort((v["ts_ns"].to_numpy(), counter, trial))
    t, c = trial[order], counter[order]
    value = v["value"].to_numpy(dtype=float)[order]
    delta = np.diff(value, prepend=np.nan)
    delta[np.r_[True, (t[1:] != t[:-1]) | (c[1:] != c[:-1])]] = 0.0
    # Sum per (trial, phase, counter) through one combined integer key and bincount.
    n_p, n_c = len(phases), len(counters)
    key = (t.astype(np.int64) * n_p + phase[order]) * n_c + c
    size = len(trials) * n_p * n_c
    sums = np.bincount(key, weights=delta, minlength=size)
    seen = np.flatnonzero(np.bincount(key, minlength=size))
    return pd.DataFrame(
        {
            "trial_id": trials[seen // (n_p * n_c)],
            "phase": phases[(seen // n_c) % n_p],
            "counter": counters[seen % n_c],
            "delta": sums[seen],
        }
    )


def _ksm_phase_deltas(ksm: pd.DataFrame) -> pd.DataFrame:
    """KSM counters' changes per trial and phase (see _vmstat_phase_deltas), long form."""
    cols = [c for c in KSM_DELTA_COLUMNS if c in ksm.columns]
    (trial, trials), (phase, phases) = _codes(ksm["trial_id"]), _codes(ksm["phase"])
    ts = ksm["ts_ns" if "ts_ns" in ksm.columns else "t_s"].to_numpy()
    order = np.lexsort((ts, trial))
    t = trial[order]
    first = np.r_[True, t[1:] != t[:-1]]
    sums = {"t": t, "p": phase[order]}
    for col in cols:
        delta = np.diff(ksm[col].to_numpy(dtype=float)[order], prepend=np.nan)
        delta[first] = 0.0
        sums[col] = delta
    out = pd.DataFrame(sums).groupby(["t", "p"], sort=True)[cols].sum().reset_index()
    out["trial_id"], out["phase"] = trials[out.pop("t")], phases[out.pop("p")]
    return out.melt(id_vars=["trial_id", "phase"], var_name="counter", value_name="delta")


def phase_deltas(run: Run) -> pd.DataFrame | None:
    """Per trial, phase and counter, the change during the phase (counter units; KSM page
    counts in pages, general_profit_bytes in bytes, ksmd_cpu_s in s). Recorded
    phase_deltas.parquet wins; otherwise vmstat samples are differenced. KSM counters come
    from KSM samples unless recorded. Columns: trial_id, phase, counter, delta, source.
    """
    parts = []
    if run.phase_deltas is not None:
        rec = run.phase_deltas[["trial_id", "phase", "counter", "delta"]]
        parts.append(
            rec.astype({"trial_id": str, "phase": str, "counter": str}).assign(
                source="recorded", delta=rec["delta"].astype(float)
            )
        )
    elif run.vmstat is not None:
        parts.append(_vmstat_phase_deltas(run.vmstat).assign(source="vmstat samples"))
    if run.ksm is not None and len(run.ksm):
        known = set(parts[0]["counter"]) if parts else set()
        k = _ksm_phase_deltas(run.ksm)
        parts.append(k[~k["counter"].isin(known)].assign(source="KSM samples"))
    if not parts:
        return None
    return pd.concat(parts, ignore_index=True)


def phase_summary(deltas: pd.DataFrame, tm: pd.DataFrame) -> pd.DataFrame:
    """Per kernel, fleet size, phase and counter over successful trials: n, median, min and
    max of the per-trial delta (counter units). Phases in experiment order."""
    keys = successful(tm)[["trial_id", "kernel", "fleet_size"]]
    d = deltas.merge(keys, on="trial_id", how="inner")
    g = d.groupby(["kernel", "fleet_size", "phase", "counter"], sort=False)["delta"]
    out = g.agg(n="count", median="median", min="min", max="max").reset_index()
    rank = {p: i for i, p in enumerate(PHASES)}
    out["_phase"] = out["phase"].map(lambda p: rank.get(p, len(rank)))
    out = out.sort_values(["kernel", "fleet_size", "counter", "_phase"]).drop(columns="_phase")
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- latency: attribution

UNATTRIBUTED = "unattributed"
TARGET_KINDS = ("guest", "host-process", "host-copy", UNATTRIBUTED)
# Runs written before attribution (issue 11) named the lab's workloads this way.
LEGACY_KIND_PREFIXES = (
    ("fragmented-", "host-copy"),
    ("host-dlfill-", "host-copy"),
    ("pattern-", "host-process"),
)
WORKLOAD_COLUMNS = ("target_kind", "pattern", "vmas", "mappings")
MAX_COUNT_LEVELS = 12  # more levels than this: a continuous count, binned by powers of two


def _category(s: pd.Series) -> pd.Series:
    """s as a categorical of strings (missing stays missing); cheap on a categorical."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.rename_categories([str(c) for c in s.cat.categories])
    return s.astype("string").astype("category")


def _masked_category(s: pd.Series, keep: np.ndarray, categories: Sequence[str] = ()) -> pd.Series:
    """Categorical s with rows outside keep set missing; categories listed first."""
    s = _category(s)
    cats = list(dict.fromkeys([*categories, *map(str, s.cat.categories)]))
    s = s.cat.set_categories(cats)
    codes = np.where(keep, s.cat.codes.to_numpy(), -1)
    return pd.Series(pd.Categorical.from_codes(codes, categories=cats), index=s.index)


def _legacy_kinds(target: pd.Series) -> pd.Series:
    """target_kind of a run written before attribution: a named target takes the kind its
    name implies (fragmented copies, pattern processes, else a guest), no target is
    unattributed. Decided per category, not per row."""
    t = _category(target)
    kinds = [
        next((k for p, k in LEGACY_KIND_PREFIXES if str(c).startswith(p)), "guest")
        for c in t.cat.categories
    ]
    lookup = np.array([TARGET_KINDS.index(k) for k in [*kinds, UNATTRIBUTED]])  # -1: none
    codes = lookup[t.cat.codes.to_numpy()]
    return pd.Series(pd.Categorical.from_codes(codes, categories=TARGET_KINDS), index=t.index)


def _na_counts(index: pd.Index) -> pd.Series:
    """An all-missing Int64 column (no per-row Python objects)."""
    n = len(index)
    return pd.Series(pd.arrays.IntegerArray(np.zeros(n, np.int64), np.ones(n, bool)), index=index)


def normalise_latency(lat: pd.DataFrame) -> pd.DataFrame:
    """The latency table under the attribution contract, whatever run wrote it: target,
    target_kind, pattern, vmas and mappings always present. Without target_kind (a run
    written before attribution) a walk with a target gets the kind its name implies, one
    without is "unattributed". An unattributed walk keeps no VMA count, mapping count or
    pattern: before attribution `vmas` was the phase's maximum over every process, the
    label under which reclaim pooled every workload as the fragmented copy's."""
    n = len(lat)
    missing = pd.Series(pd.Categorical.from_codes(np.full(n, -1), categories=[]), index=lat.index)
    target = lat["target"] if "target" in lat.columns else missing
    if "target_kind" in lat.columns:
        kind = _category(lat["target_kind"])
        if UNATTRIBUTED not in kind.cat.categories:
            kind = kind.cat.add_categories([UNATTRIBUTED])
        kind = kind.fillna(UNATTRIBUTED)
    else:
        kind = _legacy_kinds(target)
    kind = _masked_category(kind, np.ones(n, dtype=bool), TARGET_KINDS)
    attributed = (kind != UNATTRIBUTED).to_numpy()
    out = {
        "target": _masked_category(target, attributed),
        "target_kind": kind,
        "pattern": _masked_category(lat.get("pattern", missing), attributed),
    }
    for col in ("vmas", "mappings"):
        values = lat[col] if col in lat.columns else _na_counts(lat.index)
        out[col] = pd.to_numeric(values, errors="coerce").astype("Int64").where(attributed)
    return lat.assign(**out)


def count_levels(values: np.ndarray) -> np.ndarray:
    """The level of each of the distinct non-negative counts in values (same order): counts
    within LEVEL_TOLERANCE of a level's smallest share it (10,000 and 10,003 VMAs are one
    row, so kernels still pair); more than MAX_COUNT_LEVELS levels is a continuous count,
    binned by powers of two. A level is named by the lower median of its counts."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0:
        return values
    order = np.argsort(values, kind="stable")
    v = values[order]
    cluster = np.zeros(len(v), dtype=np.int64)
    start = v[0]
    for i in range(1, len(v)):  # distinct counts only: a few, or a few thousand at most
        if v[i] > start * (1 + LEVEL_TOLERANCE):
            cluster[i], start = cluster[i - 1] + 1, v[i]
        else:
            cluster[i] = cluster[i - 1]
    if cluster[-1] + 1 > MAX_COUNT_LEVELS:
        cluster = np.floor(np.log2(np.maximum(v, 1))).astype(np.int64)
    level = np.empty(len(v), dtype=np.int64)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        level[members] = v[members[(len(members) - 1) // 2]]
    out = np.empty(len(v), dtype=np.int64)
    out[order] = level
    return out


def _level_maps(frames: Sequence[pd.DataFrame]) -> dict[str, dict[int, int]]:
    """Per count column, distinct count -> level, over every frame (so that two runs
    compared share their levels)."""
    maps: dict[str, dict[int, int]] = {}
    for col in ("vmas", "mappings"):
        seen = [np.unique(f[col].dropna().to_numpy(dtype=np.int64)) for f in frames]
        uniq = np.unique(np.concatenate(seen)) if seen else np.array([], dtype=np.int64)
        maps[col] = dict(zip(uniq.tolist(), count_levels(uniq).tolist(), strict=True))
    return maps


def _levelled(s: pd.Series, level: dict[int, int]) -> np.ndarray:
    """Row levels of an Int64 count column (-1: missing), one lookup per distinct value."""
    codes, uniq = pd.factorize(s, use_na_sentinel=True)
    lookup = np.array([level[int(u)] for u in uniq] + [-1], dtype=np.int64)
    return np.asarray(lookup[codes])


def workload_label(kind: str, pattern: Any, vmas: int, mappings: int) -> str:
    """A workload row in words: "host-copy, distinct, 10,000 VMAs, 2 mappings/page"."""
    if kind == UNATTRIBUTED:
        return UNATTRIBUTED
    parts = [kind]
    if isinstance(pattern, str) and pattern:
        parts.append(pattern)
    if vmas >= 0:
        parts.append(f"{vmas:,} VMA{'s' if vmas != 1 else ''}")
    if mappings >= 0:
        parts.append(f"{mappings:,} mappings/page")
    return ", ".join(parts)


def _combined_codes(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, pd.DataFrame]:
    """Row codes of the distinct combinations of integer columns, and the combinations:
    one int64 key per row and one hash factorize (a MultiIndex is ~10x slower)."""
    key = np.zeros(len(next(iter(columns.values()))), dtype=np.int64)
    parts = {}
    for name, col in columns.items():
        c, uniq = pd.factorize(col)
        parts[name] = (np.asarray(uniq), len(uniq))
        key = key * max(len(uniq), 1) + c
    codes, ukeys = pd.factorize(key)
    ukeys = np.asarray(ukeys, dtype=np.int64)
    rows = {}
    for name in reversed(list(columns)):
        uniq, n = parts[name]
        rows[name] = uniq[ukeys % max(n, 1)]
        ukeys = ukeys // max(n, 1)
    return np.asarray(codes), pd.DataFrame({n: rows[n] for n in columns})


def label_workloads(
    lat: pd.DataFrame, levels: dict[str, dict[int, int]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lat (normalised) with a categorical `workload` column, and the workloads: one row
    per label with target_kind, pattern, vmas and mappings (levels; NA: not known), in
    display order (kinds as TARGET_KINDS, then pattern, VMAs, mappings; unattributed last).
    """
    levels = levels or _level_maps([lat])
    kind_codes, kinds = _codes(lat["target_kind"])
    pat_codes, patterns = _codes(lat["pattern"])
    v = _levelled(lat["vmas"], levels["vmas"])
    m = _levelled(lat["mappings"], levels["mappings"])
    codes, rows = _combined_codes({"k": kind_codes, "p": pat_codes, "v": v, "m": m})
    wl = pd.DataFrame(
        {
            "target_kind": kinds[rows["k"].to_numpy()],
            "pattern": [patterns[p] if p >= 0 else None for p in rows["p"]],
            "vmas": pd.array(np.where(rows["v"] >= 0, rows["v"], 0), dtype="Int64"),
            "mappings": pd.array(np.where(rows["m"] >= 0, rows["m"], 0), dtype="Int64"),
        }
    )
    wl.loc[rows["v"].to_numpy() < 0, "vmas"] = pd.NA
    wl.loc[rows["m"].to_numpy() < 0, "mappings"] = pd.NA
    wl["workload"] = [
        workload_label(str(k), p, int(vv), int(mm))
        for k, p, vv, mm in zip(wl["target_kind"], wl["pattern"], rows["v"], rows["m"], strict=True)
    ]
    rank = {k: i for i, k in enumerate(TARGET_KINDS)}
    wl["_k"] = wl["target_kind"].map(lambda k: rank.get(k, len(rank) - 1) + (k == UNATTRIBUTED))
    order = wl.sort_values(["_k", "pattern", "vmas", "mappings"], na_position="first").index
    wl = wl.drop(columns="_k")
    remap = np.empty(len(wl), dtype=np.int64)
    remap[order.to_numpy()] = np.arange(len(wl))
    labels = wl.loc[order, "workload"].tolist()
    cat = pd.Categorical.from_codes(remap[codes], categories=labels)
    return lat.assign(workload=cat), wl.loc[order].set_index("workload")


# --------------------------------------------------------------------------- latency: statistics


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
    ecdf: pd.DataFrame  # kernel, trigger, workload, method, duration_us, fraction
    by_vmas: pd.DataFrame | None  # attributed walks: kernel, trigger, method, vmas bins
    walk_cost: WalkCost | None = None


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
    grouped = lat.groupby(LATENCY_KEYS, observed=True, sort=True)
    return {_key(k): np.sort(dur[idx]) for k, idx in grouped.indices.items()}


def method_label(method: str) -> str:
    """A timing method in words ("tracepoint-proxy" -> "lower-bound proxy")."""
    return METHOD_LABELS.get(method, method)


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
    key: LatencyKey, x: np.ndarray, lower_bound: bool, rng: np.random.Generator, n_boot: int
) -> list[dict[str, Any]]:
    n, rows = len(x), []
    base = _key_row(key) | {"lower_bound": lower_bound, "n": n}
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
) -> pd.DataFrame:
    """Long table: per LatencyKey and statistic (p50 .. p99.9, max), the value and interval
    in µs, n and a note; lower_bound marks methods that under-read walks."""
    rows = [r for k, x in groups.items() for r in _latency_rows(k, x, lower_bound[k], rng, n_boot)]
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
    10 million walks draws a few hundred vertices per line. duration_us, fraction in 0..1."""
    body = np.linspace(0.0, 1.0, points)
    frames = []
    for key, x in groups.items():
        n = len(x)
        tail = 1.0 - np.logspace(-1, -max(1.0, min(6.0, math.log10(n))), points // 4)
        frac = np.unique(np.concatenate([body, tail, [1.0 / n, 1.0]]))
        idx = np.clip(np.ceil(frac * n - 1e-9).astype(np.int64) - 1, 0, n - 1)
        frames.append(
            pd.DataFrame(_key_row(key) | {"duration_us": x[idx] / 1e3, "fraction": (idx + 1) / n})
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
    lat: pd.DataFrame,
    tm: pd.DataFrame,
    kernels: Sequence[str],
    *,
    rng: np.random.Generator,
    n_boot: int = N_BOOT,
) -> LatencyAnalysis | None:
    """Every latency table, over walks of successful trials only, one row per trigger and
    workload (unattributed walks in their own rows), and the walk-cost model."""
    ok = set(successful(tm)["trial_id"])
    keep = _isin(lat["trial_id"], ok)
    if not keep.all():
        lat = lat[keep]
    if lat.empty:
        return None
    lat, workloads = label_workloads(normalise_latency(lat))
    groups = _latency_groups(lat)
    lb = lat.groupby(LATENCY_KEYS, observed=True)["lower_bound"].any()
    lower = {_key(k): bool(v) for k, v in lb.items()}
    summary = with_workload_columns(
        latency_summary(groups, lower, rng=rng, n_boot=n_boot), workloads
    )
    return LatencyAnalysis(
        n_samples=len(lat),
        n_unattributed=int((lat["target_kind"] == UNATTRIBUTED).sum()),
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
    )


# --------------------------------------------------------------------------- time series


def ksm_timeline(
    ksm: pd.DataFrame, tm: pd.DataFrame, page_bytes: int, bins: int = 240
) -> pd.DataFrame:
    """KSM sharing and profit over time, binned for plotting: per successful trial and time
    bin (s since trial start), the mean general_profit (MiB) and pages_sharing x page size
    (MiB). At most `bins` bins per trial however many samples were taken."""
    keys = successful(tm)[["trial_id", "kernel", "fleet_size"]]
    df, labels = _ksm_frame(ksm, settle_only=False)
    width = max(float(df["t_s"].max()) / bins, 1e-9)
    d = pd.DataFrame(
        {
            "tid": df["tid"],
            "t_s": np.floor(df["t_s"] / width) * width,
            "sharing_mib": df["ps"] * page_bytes / MIB,
        }
    )
    if "general_profit_bytes" in df:
        d["profit_mib"] = df["general_profit_bytes"] / MIB
    if "ksmd_cpu_s" in df:
        d["ksmd_cpu_s"] = df["ksmd_cpu_s"]
    d = d.groupby(["tid", "t_s"], sort=True).mean().reset_index()
    d.insert(0, "trial_id", labels[d.pop("tid").to_numpy()])
    return d.merge(keys, on="trial_id", how="inner")


def guest_table(guests: pd.DataFrame, tm: pd.DataFrame) -> pd.DataFrame:
    """Per kernel and fleet size over successful trials: guests, and the median and max of
    boot, ready and fill times (s)."""
    keys = successful(tm)[["trial_id", "kernel", "fleet_size"]]
    g = guests.assign(trial_id=guests["trial_id"].astype(str)).merge(keys, on="trial_id")
    cols = [c for c in ("boot_s", "ready_s", "fill_s") if c in g.columns]
    out = g.groupby(["kernel", "fleet_size"])[cols].agg(["median", "max"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out.insert(0, "guests", g.groupby(["kernel", "fleet_size"]).size())
    return out.reset_index()


# --------------------------------------------------------------------------- hygiene


def _mismatch_warnings(manifests: Sequence[dict[str, Any]]) -> list[str]:
    """A/B hygiene across runs: the same software and host on every side."""
    if len(manifests) < 2:
        return []
    facts: dict[str, Callable[[dict[str, Any]], Any]] = {
        "QEMU version": lambda m: m.get("qemu_version"),
        "libvirt version": lambda m: m.get("libvirt_version"),
        "host kernel": lambda m: (
            m.get("kernel_release") or (m.get("host") or {}).get("kernel_release")
        ),
        "accelerator": lambda m: m.get("accel") or (m.get("host") or {}).get("accel"),
        "densitylab version": lambda m: m.get("densitylab_version"),
        "spec (spec_sha256)": lambda m: m.get("spec_sha256"),
    }
    out = []
    for what, get in facts.items():
        seen = {str(m.get("run_id", "?")): get(m) for m in manifests}
        if len(set(map(str, seen.values()))) > 1:
            detail = ", ".join(f"{rid}: {v}" for rid, v in seen.items())
            out.append(f"{what} differs between runs ({detail})")
    return out


def _manifest_warnings(manifests: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for m in manifests:
        rid = m.get("run_id", "?")
        out += [f"{rid}: {w}" for w in m.get("warnings") or []]
        if not m.get("ended_at"):
            out.append(f"{rid}: ended_at is empty; the run did not finish")
        if not m.get("git_commit"):
            out.append(f"{rid}: git commit not recorded; the code that ran cannot be named")
    return out


def _order_warning(tm: pd.DataFrame) -> list[str]:
    """Kernels run in blocks (all of A, then all of B) confound the kernel with drift."""
    t = tm.dropna(subset=["started_ns"]).sort_values("started_ns")
    counts = t["kernel"].value_counts()
    if len(counts) < 2 or counts.min() < 2:
        return []
    switches = int((t["kernel"] != t["kernel"].shift()).sum()) - 1
    if switches == len(counts) - 1:
        return [
            "kernels ran in blocks, not interleaved: drift on the host over time is "
            "confounded with the kernel (interleave or randomise the trial order)"
        ]
    return []


def _trial_warnings(tm: pd.DataFrame) -> list[str]:
    out = []
    accels = set(tm["accel"].dropna().astype(str))
    if "tcg" in accels:
        out.append(
            "TCG emulation (accel=tcg): absolute times are inflated; read the ratios "
            "between kernels, not absolute values"
        )
    if len(accels) > 1:
        out.append(f"trials ran under different accelerators: {', '.join(sorted(accels))}")
    releases = tm.dropna(subset=["kernel_release"]).groupby("kernel")["kernel_release"].unique()
    out += [
        f"kernel label {k} covers several releases: {', '.join(map(str, r))}"
        for k, r in releases.items()
        if len(r) > 1
    ]
    bad = tm[tm["status"] != "successful"]
    if len(bad):
        counts = ", ".join(f"{n} {s}" for s, n in bad["status"].value_counts().items())
        out.append(f"{counts} trial(s) left out of every statistic (see the trials table)")
    unsettled = successful(tm)["settled"].astype("boolean").eq(False).sum()
    if unsettled:
        out.append(f"{unsettled} successful trial(s) never settled: their savings are not final")
    n = successful(tm).groupby(["fleet_size", "kernel"]).size().unstack(fill_value=0)
    for fleet, row in n.iterrows():
        if row.nunique() > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in row.items())
            out.append(f"unbalanced repeats at fleet size {fleet} ({detail})")
    return out + _order_warning(tm)


def _latency_warnings(lat: LatencyAnalysis | None, kernels: Sequence[str]) -> list[str]:
    if lat is None:
        return []
    s = lat.summary.drop_duplicates(["kernel", "trigger", "method"])
    out = []
    if s["lower_bound"].any():
        out.append(
            "some walk times come from a lower-bound proxy (tracepoint span): they "
            "under-read the walk and are marked as such"
        )
    for trigger, grp in s.groupby("trigger"):
        methods = grp.groupby("kernel")["method"].agg(frozenset)
        if len(set(methods)) > 1:
            out.append(
                f"trigger {trigger}: kernels were timed by different methods; only "
                "walks timed the same way are compared"
            )
    if lat.n_unattributed:
        share = lat.n_unattributed / max(lat.n_samples, 1)
        out.append(
            f"{lat.n_unattributed:,} walks ({share:.1%}) could not be attributed to a "
            "workload: they stand in their own 'unattributed' rows, under no VMA count"
        )
    return out


def _dropped_latency(run: Run, lat: LatencyAnalysis | None) -> list[str]:
    """Walks were recorded, yet none belongs to a successful trial: say so, rather than let
    the report read "not recorded"."""
    if lat is None and run.latency is not None and len(run.latency):
        return [
            f"latency.parquet holds {len(run.latency):,} walks but none from a successful "
            "trial (trial_id not in trials.parquet, or those trials failed)"
        ]
    return []


def hygiene_warnings(
    run: Run, tm: pd.DataFrame, latency: LatencyAnalysis | None = None, kernels: Sequence[str] = ()
) -> list[str]:
    """Everything that weakens an A/B comparison, as sentences, manifests' warnings first."""
    out = _manifest_warnings(run.manifests) + _mismatch_warnings(run.manifests)
    return out + _trial_warnings(tm) + _latency_warnings(latency, kernels)


# --------------------------------------------------------------------------- whole analysis


@dataclass(frozen=True)
class Analysis:
    """Everything a report shows. None: that table was not recorded in the run(s)."""

    run: Run
    kernels: list[str]
    trials: pd.DataFrame
    repeats: pd.DataFrame
    comparisons: pd.DataFrame
    phase_deltas: pd.DataFrame | None
    phase_summary: pd.DataFrame | None
    guests: pd.DataFrame | None
    timeline: pd.DataFrame | None
    latency: LatencyAnalysis | None
    capacity: Any  # capacity.CapacityResult | None
    warnings: list[str] = field(default_factory=list)
    capacity_note: str | None = None  # why there is no capacity table, when it is not wanted
    published: pd.DataFrame | None = None  # rmap-bench: the series' figures beside ours

    @property
    def manifests(self) -> list[dict[str, Any]]:
        return self.run.manifests


HOST_PROCESS = "host-process"


def capacity_trials(run: Run, tm: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The trials a capacity projection applies to: not those whose "guests" are host
    processes (guests.workload_kind "host-process": a lab host running guest-memory
    patterns as processes, no VM to fit on a host). With a note when some or all are out."""
    g = run.guests
    if g is None or "workload_kind" not in g.columns:
        return tm, None
    kinds = g.assign(trial_id=g["trial_id"].astype(str)).groupby("trial_id")["workload_kind"]
    hosted = kinds.agg(lambda k: bool((k.astype(str) == HOST_PROCESS).all()))
    out = set(hosted[hosted].index)
    if not out:
        return tm, None
    keep = tm[~tm["trial_id"].isin(out)]
    if successful(keep).empty:
        return keep, "not applicable: the guests are host processes (guests.workload_kind)"
    return keep, f"{len(out)} trial(s) left out: their guests are host processes"


def analyze(
    runs: Sequence[Run] | Run,
    *,
    host_ram_gib: float | None = None,
    reserve_gib: float = 2.0,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> Analysis:
    """Analyse one or several runs together. host_ram_gib None: taken from the manifests'
    host facts when they carry it. Deterministic for a given seed."""
    from orchestrator.capacity import capacity_model, host_ram_from_manifests

    run = combine_runs([runs] if isinstance(runs, Run) else list(runs))
    rng = np.random.default_rng(seed)
    tm = trial_metrics(run)
    kernels = kernel_order(run)
    ok = successful(tm)
    deltas = phase_deltas(run)
    lat = None
    if run.latency is not None and len(run.latency):
        lat = analyze_latency(run.latency, tm, kernels, rng=rng, n_boot=n_boot)
    host_ram = host_ram_gib if host_ram_gib is not None else host_ram_from_manifests(run.manifests)
    cap_tm, cap_note = capacity_trials(run, tm)
    specs = [str(m.get("spec_name")) for m in run.manifests]
    published = None
    if lat is not None and is_rmap_bench(specs, lat.summary):
        published = published_comparison(lat.summary, kernels)
    return Analysis(
        run=run,
        kernels=kernels,
        trials=tm,
        repeats=repeat_summary(ok, ["kernel", "fleet_size"], list(TRIAL_METRICS)),
        comparisons=kernel_comparisons(tm, kernels, n_boot=n_boot, rng=rng),
        phase_deltas=deltas,
        phase_summary=None if deltas is None else phase_summary(deltas, tm),
        guests=None if run.guests is None else guest_table(run.guests, tm),
        timeline=None
        if run.ksm is None or not len(run.ksm)
        else ksm_timeline(run.ksm, tm, _page_bytes(run)),
        latency=lat,
        capacity=capacity_model(
            cap_tm, host_ram_gib=host_ram, reserve_gib=reserve_gib, kernels=kernels, rng=rng
        ),
        warnings=hygiene_warnings(run, tm, lat, kernels) + _dropped_latency(run, lat),
        capacity_note=cap_note,
        published=published,
    )


# --------------------------------------------------------------------------- run vs run


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
    if ra.latency is None or rb.latency is None:
        return None
    la = ra.latency[_isin(ra.latency["trial_id"], set(successful(tma)["trial_id"]))]
    lb = rb.latency[_isin(rb.latency["trial_id"], set(successful(tmb)["trial_id"]))]
    levels = _level_maps([la, lb])  # shared, so that a workload row is the same in both
    (la, wa), (lb, wb) = label_workloads(la, levels), label_workloads(lb, levels)
    ga, gb = _latency_groups(la), _latency_groups(lb)
    rows = []
    for ka, kb in pairs:
        for key, a in ga.items():
            b = gb.get(key._replace(kernel=kb))
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
                    "n_a": c.n_b,
                    "n_b": c.n_a,
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
    workloads = pd.concat([wa, wb])
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


# --------------------------------------------------------------------------- text output


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
