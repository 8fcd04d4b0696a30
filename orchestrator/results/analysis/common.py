"""Constants and small column helpers shared by the analysis modules."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "HOST_PROCESS",
    "KSMD_CPU_PHASES",
    "KSM_DELTA_COLUMNS",
    "LATENCY_QUANTILES",
    "LEVEL_TOLERANCE",
    "METHOD_LABELS",
    "MIB",
    "OPTIONAL_TRIAL_COLUMNS",
    "PAGE_BYTES_DEFAULT",
    "PHASES",
    "SETTLE_PHASES",
    "TAIL_MIN",
    "TRIAL_METRICS",
    "UNATTRIBUTED",
    "method_label",
]

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
# ksmd's cost of a KSM setting is read over these phases: KSM runs at the trial's knobs
# from the merge on, and the hold shows what it costs once merged.
KSMD_CPU_PHASES = ("merge", "hold")

LATENCY_QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99.9": 0.999}

TAIL_MIN = 10  # fewer samples than this beyond a quantile: its interval is unreliable

METHOD_LABELS = {
    "tracepoint": "rmap walk tracepoint",
    "bpf-fentry": "BPF fentry/fexit",
    "kprobe": "kprobe pair",
    "tracepoint-proxy": "lower-bound proxy",
}

OPTIONAL_TRIAL_COLUMNS = (
    "ksm_setting",
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
    "ksmd_cpu_pct": "ksmd CPU over merge and hold (% of one core)",
    "ksmd_cpu_s_per_gib": "ksmd CPU per GiB saved (s/GiB)",
    "fill_s_median": "guest fill time, median guest (s)",
    "fill_s_max": "guest fill time, slowest guest (s)",
    "mappings_per_ksm_page": "mappings per KSM page at the end of merge (count)",
}

LEVEL_TOLERANCE = 0.05  # counts within 5% of a level's smallest are one level


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


UNATTRIBUTED = "unattributed"


def method_label(method: str) -> str:
    """A timing method in words ("tracepoint-proxy" -> "lower-bound proxy")."""
    return METHOD_LABELS.get(method, method)


HOST_PROCESS = "host-process"
