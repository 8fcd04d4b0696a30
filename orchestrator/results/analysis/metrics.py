"""Per-trial KSM metrics and the kernel comparisons over trials."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from orchestrator.results.analysis.common import (
    KSMD_CPU_PHASES,
    MIB,
    PAGE_BYTES_DEFAULT,
    SETTLE_PHASES,
    TRIAL_METRICS,
    _codes,
)
from orchestrator.results.analysis.load import Run
from orchestrator.results.analysis.stats import (
    N_BOOT,
    _comparison_row,
    _finish_comparisons,
    compare_samples,
)

__all__ = [
    "kernel_comparisons",
    "kernel_order",
    "ksmd_cpu_pct",
    "merge_milestones",
    "os_and_workload_savings",
    "successful",
    "trial_metrics",
]


# The KSM sample columns the per-trial metrics read.
KSM_METRIC_COLUMNS = (
    "trial_id",
    "phase",
    "t_s",
    "pages_sharing",
    "general_profit_bytes",
    "ksmd_cpu_s",
)


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


def ksmd_cpu_pct(ksm: pd.DataFrame) -> pd.DataFrame:
    """Per trial: ksmd's CPU (utime + stime of the ksmd thread) over the merge and hold
    phases per second of wall time, in % of one core (columns trial_id, ksmd_cpu_pct).
    A trial with fewer than two such samples has none."""
    if "ksmd_cpu_s" not in ksm.columns:
        return pd.DataFrame(columns=["trial_id", "ksmd_cpu_pct"])
    keep = ksm["phase"].astype(str).isin(KSMD_CPU_PHASES).to_numpy()
    k = pd.DataFrame(
        {
            "trial_id": ksm["trial_id"].astype(str).to_numpy()[keep],
            "t_s": ksm["t_s"].to_numpy(dtype=float)[keep],
            "cpu": ksm["ksmd_cpu_s"].to_numpy(dtype=float)[keep],
        }
    ).dropna()
    g = k.sort_values(["trial_id", "t_s"], kind="stable").groupby("trial_id")
    wall = g["t_s"].last() - g["t_s"].first()
    pct = 100 * (g["cpu"].last() - g["cpu"].first()) / wall.where(wall > 0)
    return pct.rename("ksmd_cpu_pct").rename_axis("trial_id").reset_index()


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


def os_and_workload_savings(trials: pd.DataFrame) -> pd.DataFrame | None:
    """Per successful guest trial whose idle baseline ran: what the OS alone shares (the
    idle fleet, settled before the workload), what the fleet shares with its workload
    (the merge, settled), and their difference, the workload's own saving; each per
    guest (MiB). None when no trial measured an idle baseline (process fleets, or runs
    with phases.baseline off)."""
    need = {"baseline_saving_mib", "total_saving_mib", "baseline_settled", "fleet_size"}
    if not need <= set(trials.columns):
        return None
    ok = trials[(trials["status"] == "successful") & trials["baseline_settled"].notna()]
    ok = ok[ok["total_saving_mib"].notna()]
    if ok.empty:
        return None
    n = ok["fleet_size"].astype(float)
    os_alone = ok["baseline_saving_mib"].astype(float) / n
    with_workload = ok["total_saving_mib"].astype(float) / n
    return pd.DataFrame(
        {
            "trial_id": ok["trial_id"].astype(str),
            "kernel": ok["kernel"].astype(str),
            "fleet_size": ok["fleet_size"].astype(int),
            "os_alone_mib_per_guest": os_alone.round(1),
            "with_workload_mib_per_guest": with_workload.round(1),
            "workload_own_mib_per_guest": (with_workload - os_alone).round(1),
            "baseline_settled": ok["baseline_settled"].astype(bool),
            "settled": ok["settled"].astype(bool),
            "ksmd_cpu_s": ok["ksmd_cpu_s"].astype(float).round(2),
        }
    ).reset_index(drop=True)


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
    # "" when no knob was swept, so that settings group like any other key.
    tm["ksm_setting"] = run.trials["ksm_setting"].astype("string").fillna("").astype(str)
    tm["saved_profit_mib"] = run.trials["general_profit_mib"].astype(float)
    sharing = pd.to_numeric(run.trials["pages_sharing"], errors="coerce").astype(float)
    tm["saved_sharing_mib"] = sharing * page_bytes / MIB
    tm["ksmd_cpu_s"] = run.trials["ksmd_cpu_s"].astype(float)
    tm["measured_saving_mib"] = attributed_saving(run.trials)
    tm["scramble_saving_mib"] = run.trials["measured_saving_mib"].astype(float)
    tm["saving_method"] = saving_methods(run.trials)
    tm["mappings_per_ksm_page"] = run.trials["mappings_per_ksm_page"].astype(float)
    if run.has("ksm"):
        milestones, finals, cpu_pct = [], [], []
        for ksm in run.frames("ksm", KSM_METRIC_COLUMNS):  # one run file at a time
            milestones.append(merge_milestones(ksm))
            finals.append(_ksm_finals(ksm, page_bytes))
            cpu_pct.append(ksmd_cpu_pct(ksm))
        tm = tm.merge(pd.concat(milestones, ignore_index=True), on="trial_id", how="left")
        tm = tm.merge(pd.concat(cpu_pct, ignore_index=True), on="trial_id", how="left")
        fin = pd.concat(finals, ignore_index=True)
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
        "ksmd_cpu_pct",
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
