"""Analysis of run directories: per-trial KSM metrics, per-phase deltas, latency statistics,
kernel comparisons and run-to-run comparisons. No plotting, and nothing here touches the
host; every result is a pure function of the run directories.

By topic: load (run directories, combining runs), stats (quantiles, bootstrap, rank tests;
its docstring states the methods), metrics (per trial), phases, labels (latency
attribution), latency, series, hygiene, compare (run against run). The text rendering is
orchestrator.results.text. This package re-exports the public names of its modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

# Public names of the modules, re-exported: `from orchestrator.results import analysis as an`.
from orchestrator.results.analysis.common import *  # noqa: F403
from orchestrator.results.analysis.common import HOST_PROCESS as HOST_PROCESS
from orchestrator.results.analysis.common import TRIAL_METRICS as TRIAL_METRICS
from orchestrator.results.analysis.compare import *  # noqa: F403
from orchestrator.results.analysis.hygiene import *  # noqa: F403
from orchestrator.results.analysis.hygiene import _dropped_latency
from orchestrator.results.analysis.hygiene import hygiene_warnings as hygiene_warnings
from orchestrator.results.analysis.labels import *  # noqa: F403
from orchestrator.results.analysis.latency import *  # noqa: F403
from orchestrator.results.analysis.latency import LatencyAnalysis as LatencyAnalysis
from orchestrator.results.analysis.latency import analyze_latency as analyze_latency
from orchestrator.results.analysis.load import *  # noqa: F403
from orchestrator.results.analysis.load import Run as Run
from orchestrator.results.analysis.load import combine_runs as combine_runs
from orchestrator.results.analysis.metrics import *  # noqa: F403
from orchestrator.results.analysis.metrics import _page_bytes
from orchestrator.results.analysis.metrics import kernel_comparisons as kernel_comparisons
from orchestrator.results.analysis.metrics import kernel_order as kernel_order
from orchestrator.results.analysis.metrics import successful as successful
from orchestrator.results.analysis.metrics import trial_metrics as trial_metrics
from orchestrator.results.analysis.phases import *  # noqa: F403
from orchestrator.results.analysis.phases import phase_deltas as phase_deltas
from orchestrator.results.analysis.phases import phase_summary as phase_summary
from orchestrator.results.analysis.series import *  # noqa: F403
from orchestrator.results.analysis.series import guest_table as guest_table
from orchestrator.results.analysis.series import run_timeline as run_timeline
from orchestrator.results.analysis.stats import *  # noqa: F403
from orchestrator.results.analysis.stats import N_BOOT as N_BOOT
from orchestrator.results.analysis.stats import SEED as SEED
from orchestrator.results.analysis.stats import repeat_summary as repeat_summary
from orchestrator.results.analysis.walks import *  # noqa: F403
from orchestrator.walkcost import is_rmap_bench, published_comparison


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
    # guest fleets with an idle baseline: the OS alone beside the fleet with its workload
    savings: pd.DataFrame | None = None

    @property
    def manifests(self) -> list[dict[str, Any]]:
        return self.run.manifests


def repeat_keys(tm: pd.DataFrame) -> list[str]:
    """What the repeats are summarised by: kernel and fleet size, and the KSM setting
    when the runs swept one."""
    swept = "ksm_setting" in tm and tm["ksm_setting"].astype(str).nunique() > 1
    return ["kernel", "fleet_size", *(["ksm_setting"] if swept else [])]


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


def spec_budget(manifests: Sequence[dict[str, Any]]) -> Any:
    """The capacity budget the runs' spec asked for (`capacity:`), from the first manifest
    whose recorded spec has one; a value that is not a number is left out (the run store
    is input too: edited, truncated)."""
    from orchestrator.capacity import Budget

    for m in manifests:
        cap = (m.get("spec") or {}).get("capacity") if isinstance(m.get("spec"), dict) else None
        if isinstance(cap, dict):
            vals = {
                k: float(cap[k])
                for k in ("reserve_mib", "ksmd_cpu_max_pct", "settle_max_s")
                if isinstance(cap.get(k), int | float) and not isinstance(cap.get(k), bool)
            }
            return Budget(**vals)
    return Budget()


def resolve_budget(manifests: Sequence[dict[str, Any]], given: Any) -> Any:
    """The spec's budget with every field given (not None) taking its place."""
    from dataclasses import replace

    base = spec_budget(manifests)
    if given is None:
        return base
    over = {k: v for k, v in vars(given).items() if v is not None}
    return replace(base, **over)


def analyze(
    runs: Sequence[Run] | Run,
    *,
    host_ram_gib: float | None = None,
    reserve_gib: float = 2.0,
    budget: Any = None,
    n_boot: int = N_BOOT,
    seed: int = SEED,
) -> Analysis:
    """Analyse one or several runs together. host_ram_gib None: taken from the manifests'
    host facts when they carry it. budget (capacity.Budget): its fields that are not None
    replace the spec's `capacity:` ones; a reserve_mib there replaces reserve_gib.
    Deterministic for a given seed."""
    from orchestrator.capacity import capacity_model, host_ram_from_manifests

    run = combine_runs([runs] if isinstance(runs, Run) else list(runs))
    rng = np.random.default_rng(seed)
    tm = trial_metrics(run)
    kernels = kernel_order(run)
    ok = successful(tm)
    deltas = phase_deltas(run)
    lat = None
    if run.has("latency"):
        lat = analyze_latency(run, tm, kernels, rng=rng, n_boot=n_boot)
    host_ram = host_ram_gib if host_ram_gib is not None else host_ram_from_manifests(run.manifests)
    budget = resolve_budget(run.manifests, budget)
    if budget.reserve_mib is not None:
        reserve_gib = budget.reserve_mib / 1024
    cap_tm, cap_note = capacity_trials(run, tm)
    specs = [str(m.get("spec_name")) for m in run.manifests]
    published = None
    if lat is not None and is_rmap_bench(specs, lat.summary):
        published = published_comparison(lat.summary, kernels)
    return Analysis(
        run=run,
        kernels=kernels,
        trials=tm,
        repeats=repeat_summary(ok, repeat_keys(ok), list(TRIAL_METRICS)),
        comparisons=kernel_comparisons(tm, kernels, n_boot=n_boot, rng=rng),
        phase_deltas=deltas,
        phase_summary=None if deltas is None else phase_summary(deltas, tm),
        guests=None if run.guests is None else guest_table(run.guests, tm),
        timeline=None if not run.has("ksm") else run_timeline(run, tm, _page_bytes(run)),
        latency=lat,
        capacity=capacity_model(
            cap_tm,
            host_ram_gib=host_ram,
            reserve_gib=reserve_gib,
            kernels=kernels,
            budget=budget,
            rng=rng,
        ),
        warnings=hygiene_warnings(run, tm, lat, kernels) + _dropped_latency(run, lat),
        capacity_note=cap_note,
        published=published,
        savings=os_and_workload_savings(run.trials),
    )
