"""KSM time series and the guests table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.results.analysis.common import MIB
from orchestrator.results.analysis.load import Run
from orchestrator.results.analysis.metrics import KSM_METRIC_COLUMNS, _ksm_frame, successful

__all__ = ["TIMELINE_COLUMNS", "guest_table", "ksm_timeline", "run_timeline"]


# The timeline reads the KSM columns the per-trial metrics read.
TIMELINE_COLUMNS = KSM_METRIC_COLUMNS


def run_timeline(run: Run, tm: pd.DataFrame, page_bytes: int, bins: int = 240) -> pd.DataFrame:
    """ksm_timeline over every KSM sample of run, one run file at a time, in bins of one
    width (the longest trial's time / bins)."""
    longest = max(
        float(pc.max(pq.read_table(p.path, columns=["t_s"]).column(0)).as_py() or 0.0)
        for p in run.parts["ksm"]
        if p.rows
    )
    width = max(longest / bins, 1e-9)
    frames = [
        ksm_timeline(f, tm, page_bytes, width=width) for f in run.frames("ksm", TIMELINE_COLUMNS)
    ]
    return pd.concat(frames, ignore_index=True)


def ksm_timeline(
    ksm: pd.DataFrame,
    tm: pd.DataFrame,
    page_bytes: int,
    bins: int = 240,
    width: float | None = None,
) -> pd.DataFrame:
    """KSM sharing and profit over time, binned for plotting: per successful trial and time
    bin (s since trial start, bins of `width` s; None: the longest trial's / bins), the
    mean general_profit (MiB) and pages_sharing x page size (MiB). At most `bins` bins per
    trial however many samples were taken."""
    keys = successful(tm)[["trial_id", "kernel", "fleet_size"]]
    df, labels = _ksm_frame(ksm, settle_only=False)
    width = width or max(float(df["t_s"].max()) / bins, 1e-9)
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
