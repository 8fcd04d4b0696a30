"""Everything that weakens an A/B comparison, as sentences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from orchestrator.results.analysis.latency import LatencyAnalysis
from orchestrator.results.analysis.load import Run
from orchestrator.results.analysis.metrics import successful

__all__ = ["hygiene_warnings"]


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
    if lat.sampled_rows:
        out.append(
            f"{lat.sampled_rows} latency row(s) hold more than {lat.cap:,} walks: their "
            f"quantiles, intervals, rank tests, per-trial medians, ECDF and VMA bins come "
            f"from a fixed-seed uniform sample of about {lat.cap:,} walks each (n_sampled "
            "beside n, which counts every walk); the intervals are those of the sample"
        )
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
    if lat is None and run.has("latency"):
        return [
            f"latency.parquet holds {run.rows('latency'):,} walks but none from a successful "
            "trial (trial_id not in trials.parquet, or those trials failed)"
        ]
    return []


def hygiene_warnings(
    run: Run, tm: pd.DataFrame, latency: LatencyAnalysis | None = None, kernels: Sequence[str] = ()
) -> list[str]:
    """Everything that weakens an A/B comparison, as sentences, manifests' warnings first."""
    out = _manifest_warnings(run.manifests) + _mismatch_warnings(run.manifests)
    return out + _trial_warnings(tm) + _latency_warnings(latency, kernels)
