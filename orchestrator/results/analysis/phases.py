"""Per-phase counter deltas (vmstat and KSM counters)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.results.analysis.common import KSM_DELTA_COLUMNS, PHASES, _codes
from orchestrator.results.analysis.load import Run
from orchestrator.results.analysis.metrics import successful

__all__ = ["phase_deltas", "phase_summary"]


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
    elif run.has("vmstat"):
        v = pd.concat([_vmstat_phase_deltas(f) for f in run.frames("vmstat")], ignore_index=True)
        parts.append(v.assign(source="vmstat samples"))
    if run.has("ksm"):
        known = set(parts[0]["counter"]) if parts else set()
        columns = ["trial_id", "phase", "ts_ns", "t_s", *KSM_DELTA_COLUMNS]
        k = pd.concat([_ksm_phase_deltas(f) for f in run.frames("ksm", columns)])
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
