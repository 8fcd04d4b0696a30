"""Synthetic run directories that follow the run-directory contract (results/<run_id>/).

Shared by the unit and system tests and by bench/report_scale.py. The numbers are
shaped like the lab's measurements (LAB-NOTES.md): TCG guests of 256 MiB filling 160 MiB
of identical pages, KSM settling in a few full scans, ksmd at ~0.07 CPU-s per second, and
rmap_walk_ksm taking ~35 µs per VMA on the old kernel (the whole anon_vma interval tree is
walked) but ~85 ns per VMA on the new one (one page index kept in the rmap item).

Kernels named in Synthetic.old_kernels play "old", every other one "new". Nothing here
touches the host.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import integrity, store
from orchestrator.results import schema

PAGE_BYTES = 4096
PAGES_PER_MIB = (1 << 20) // PAGE_BYTES
NS = 1_000_000_000
PHASE_S = {  # nominal phase lengths (s); merge is stretched with the fleet size
    "boot": 8.0,
    "baseline": 4.0,
    "fill": 20.0,
    "merge": 20.0,
    "hold": 15.0,
    "reclaim": 12.0,
    "migrate": 12.0,
    "teardown": 4.0,
}
VMSTAT_COUNTERS = (
    "pswpout",
    "pswpin",
    "ksm_swpin_copy",
    "cow_ksm",
    "pgmigrate_success",
    "compact_migrate_scanned",
)
ALL_TABLES = frozenset(schema.RUN_TABLES)  # the schema's own list
TRIGGER_SHARE = {"migrate": 0.5, "reclaim": 0.3, "compaction": 0.2}


@dataclass(frozen=True)
class KsmSetting:
    """A swept KSM setting as a synthetic run shows it: the share of the full saving it
    reaches, ksmd's CPU per second of merge and hold, and how long it takes to settle."""

    setting: str  # trials.ksm_setting, e.g. "pages_to_scan=100"
    saving_share: float = 1.0
    ksmd_cpu_per_s: float = 0.07
    settle_s: float = 10.0


@dataclass(frozen=True)
class Synthetic:
    """What to generate. Sizes are totals over the whole run."""

    run_id: str = "synthetic-0001"
    spec_name: str = "ab-ksm-walk"
    kernels: tuple[str, ...] = ("6.12", "7.3")
    old_kernels: tuple[str, ...] = ("6.12",)  # these walk the whole anon_vma tree
    fleet_sizes: tuple[int, ...] = (2, 4)
    repeats: int = 3
    guest_memory_mib: int = 256
    workload_mib: int = 160
    ksm_samples: int | None = None  # None: one sample per second
    latency_samples: int = 20_000
    proxy_share: float = 0.1  # share of migrate walks timed by the tracepoint proxy
    failed_trials: int = 1
    tables: frozenset[str] = ALL_TABLES
    warnings: tuple[str, ...] = ()
    seed: int = 0
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    # Walk attribution (issue 11). False: the schema before it (no target columns, `vmas`
    # drawn per walk as the phase maximum once was).
    attributed: bool = True
    vma_levels: tuple[int, ...] = (2000, 10000)  # one fragmented host copy at each
    pattern_process: bool = False  # also a guest-memory pattern process (1 VMA)
    one_content: bool = False  # also a one-content copy (the series' benchmark shape)
    unattributed_share: float = 0.05
    guest_kind: str | None = None  # guests.workload_kind, e.g. "host-process"
    ksm_sweep: tuple[KsmSetting, ...] = ()  # empty: no knob swept


@dataclass(frozen=True)
class _Trial:
    trial_id: str
    kernel: str
    kernel_index: int
    fleet_size: int
    repeat: int
    status: str
    start_ns: int
    ksm: KsmSetting | None = None


def _release(kernel: str) -> str:
    return f"{kernel}.0-synthetic-cloud-amd64"


def _plan(syn: Synthetic) -> list[_Trial]:
    trials, start_ns = [], 1_000 * NS
    settings: tuple[KsmSetting | None, ...] = syn.ksm_sweep or (None,)
    for ki, kernel in enumerate(syn.kernels):
        for n in syn.fleet_sizes:
            for si, k in enumerate(settings):
                for r in range(syn.repeats):
                    tid = f"{syn.run_id}-{kernel}-n{n}" + (f"-k{si}" if k else "") + f"-r{r}"
                    trials.append(_Trial(tid, kernel, ki, n, r, "successful", start_ns, k))
                    start_ns += 200 * NS
    # The last repeats of the first kernel's largest fleet fail (a guest never got ready).
    failing = [t for t in trials if t.kernel_index == 0 and t.fleet_size == max(syn.fleet_sizes)]
    for t in failing[len(failing) - syn.failed_trials :] if syn.failed_trials else []:
        trials[trials.index(t)] = replace(t, status="failed")
    return trials


def _phase_bounds(t: _Trial) -> dict[str, tuple[float, float]]:
    bounds, t0 = {}, 0.0
    for phase, length in PHASE_S.items():
        length = length + 3.0 * t.fleet_size if phase == "merge" else length
        bounds[phase] = (t0, t0 + length)
        t0 += length
    return bounds


def _sample_times(syn: Synthetic, trial: _Trial, n_ok: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample times (s since trial start) and the phase of each."""
    bounds = _phase_bounds(trial)
    end = bounds["teardown"][1]
    if trial.status != "successful":
        end = bounds["boot"][1]  # a failed trial has boot samples only
    step = 1.0 if syn.ksm_samples is None else bounds["teardown"][1] * n_ok / syn.ksm_samples
    t = np.arange(0.0, end, step)
    edges = np.array([b[1] for b in bounds.values()])
    phase = np.array(list(bounds))[np.minimum(np.searchsorted(edges, t, "right"), len(edges) - 1)]
    return t, phase


def _merge_curve(syn: Synthetic, trial: _Trial, t: np.ndarray, rng: np.random.Generator):
    """pages_sharing over time: exponential approach during merge, a dip in reclaim."""
    b = _phase_bounds(trial)
    final = (trial.fleet_size - 1) * syn.workload_mib * PAGES_PER_MIB * rng.uniform(0.96, 0.99)
    final *= trial.ksm.saving_share if trial.ksm else 1.0
    tau = 4.0 + 0.6 * trial.fleet_size * rng.uniform(0.9, 1.1)
    since = np.clip(t - b["merge"][0], 0, None)
    frac = np.where(t >= b["merge"][0], 1 - np.exp(-since / tau), 0.0)
    r0, r1 = b["reclaim"]
    frac = frac * np.where(t >= r0, 1 - 0.2 * np.clip((t - r0) / (r1 - r0), 0, 1), 1.0)
    frac = np.where(t >= b["teardown"][0], 0.0, frac)
    return np.floor(final * frac).astype(np.int64)


def _ksm_table(syn: Synthetic, trial: _Trial, t, phase, rng) -> pd.DataFrame:
    b = _phase_bounds(trial)
    sharing = _merge_curve(syn, trial, t, rng)
    shared = np.where(sharing > 0, syn.workload_mib * PAGES_PER_MIB, 0).astype(np.int64)
    on = np.clip(t - b["merge"][0], 0, None)
    rmap_items = np.where(on > 0, trial.fleet_size * syn.workload_mib * PAGES_PER_MIB, 0)
    rate = trial.ksm.ksmd_cpu_per_s if trial.ksm else 0.07
    cpu = rate * np.minimum(on, b["hold"][1] - b["merge"][0]) + 0.02 * np.clip(
        t - b["hold"][1], 0, None
    )
    cpu = cpu * rng.uniform(0.85, 1.15)
    used_kib = trial.fleet_size * syn.guest_memory_mib * 1024 - sharing * 4
    n = len(t)
    return pd.DataFrame(
        {
            "trial_id": trial.trial_id,
            "phase": phase,
            "ts_ns": trial.start_ns + (t * NS).astype(np.int64),
            "t_s": t,
            "full_scans": np.floor(on / 5.0).astype(np.int64),
            "pages_scanned": (on * 2000 / 0.02).astype(np.int64),
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": np.where(on > 0, 3000, 0).astype(np.int64),
            "pages_volatile": rng.integers(0, 50, n),
            "pages_skipped": np.zeros(n, np.int64),
            "general_profit_bytes": sharing * PAGE_BYTES - rmap_items * 64,
            "ksm_zero_pages": np.zeros(n, np.int64),
            "stable_node_chains": np.zeros(n, np.int64),
            "stable_node_dups": np.zeros(n, np.int64),
            "ksmd_cpu_s": cpu,
            "mem_free_kib": (24 << 20) - used_kib - rng.integers(0, 2048, n),
            "mem_available_kib": (24 << 20) - used_kib + 100_000 - rng.integers(0, 2048, n),
        }
    )


def _vmstat_table(syn: Synthetic, trial: _Trial, ksm: pd.DataFrame) -> pd.DataFrame:
    """Cumulative counters in long form, moving in the phases that drive them."""
    b, t, n = _phase_bounds(trial), ksm["t_s"].to_numpy(), trial.fleet_size
    dup = syn.workload_mib * PAGES_PER_MIB

    def ramp(phase: str, total: float) -> np.ndarray:
        lo, hi = b[phase]
        return np.floor(total * np.clip((t - lo) / (hi - lo), 0, 1)).astype(np.int64)

    values = {
        "pswpout": ramp("reclaim", 0.2 * dup * n),
        "pswpin": ramp("migrate", 0.01 * dup),
        "ksm_swpin_copy": ramp("migrate", 0.005 * dup),
        "cow_ksm": ramp("hold", 40 * n),
        "pgmigrate_success": ramp("migrate", 0.5 * dup * n),
        "compact_migrate_scanned": ramp("migrate", 2 * dup * n),
    }
    parts = [
        pd.DataFrame(
            {
                "trial_id": trial.trial_id,
                "phase": ksm["phase"],
                "ts_ns": ksm["ts_ns"],
                "t_s": t,
                "counter": name,
                "value": 1_000_000 + v,
            }
        )
        for name, v in values.items()
    ]
    return pd.concat(parts, ignore_index=True)


def _process_table(syn: Synthetic, trial: _Trial, ksm: pd.DataFrame) -> pd.DataFrame:
    every = ksm.iloc[::5]
    per_guest = every["pages_sharing"].to_numpy() // trial.fleet_size
    parts = [
        pd.DataFrame(
            {
                "trial_id": trial.trial_id,
                "phase": every["phase"].to_numpy(),
                "ts_ns": every["ts_ns"].to_numpy(),
                "t_s": every["t_s"].to_numpy(),
                "guest": f"{trial.trial_id}-g{g}",
                "pid": 10_000 + g,
                "ksm_rmap_items": syn.workload_mib * PAGES_PER_MIB,
                "ksm_zero_pages": 0,
                "ksm_merging_pages": per_guest,
                "ksm_process_profit_bytes": per_guest * PAGE_BYTES - 64 * per_guest,
                "ram_vmas": 1,
            }
        )
        for g in range(trial.fleet_size)
    ]
    return pd.concat(parts, ignore_index=True)


def _guests_table(syn: Synthetic, trial: _Trial, rng) -> pd.DataFrame:
    n = trial.fleet_size
    boot = rng.uniform(4.0, 6.5, n)
    return pd.DataFrame(
        {
            "trial_id": trial.trial_id,
            "guest": [f"{trial.trial_id}-g{g}" for g in range(n)],
            "boot_s": boot,
            "ready_s": boot + rng.uniform(0.5, 1.5, n),
            "fill_s": rng.uniform(14.0, 34.0, n),
            "dup_pages": syn.workload_mib * PAGES_PER_MIB,
            "zero_pages": 0,
            "unique_pages": (syn.guest_memory_mib - syn.workload_mib) * PAGES_PER_MIB // 4,
            "volatile_pages": rng.integers(0, 100, n),
            "vmas": 1,
        }
        | ({} if syn.guest_kind is None else {"workload_kind": syn.guest_kind})
    )


def _events_table(trial: _Trial) -> pd.DataFrame:
    b = _phase_bounds(trial)
    if trial.status != "successful":
        b = {"boot": b["boot"]}
    rows = [(p, lo, "phase_start", "") for p, (lo, _hi) in b.items()]
    rows += [(p, b[p][0] + 1, "trigger", p) for p in ("reclaim", "migrate") if p in b]
    if trial.status != "successful":
        rows.append(("boot", b["boot"][1], "error", "guest g1 not ready after 120 s"))
    t = np.array([r[1] for r in rows])
    return pd.DataFrame(
        {
            "trial_id": trial.trial_id,
            "ts_ns": trial.start_ns + (t * NS).astype(np.int64),
            "t_s": t,
            "phase": [r[0] for r in rows],
            "event": [r[2] for r in rows],
            "detail": [r[3] for r in rows],
        }
    )


def _integrity_table(syn: Synthetic, trial: _Trial) -> pd.DataFrame:
    """What the runner's checks record: every guest verified after merge and each
    trigger, no page corrupted. A failed trial (boot) got to no check."""
    b = _phase_bounds(trial)
    checks = [(p, 0) for p in ("merge", "migrate", "reclaim") if p in b]
    if trial.status != "successful":
        checks = []
    pages = syn.workload_mib * PAGES_PER_MIB
    rows = [
        {
            "trial_id": trial.trial_id,
            "phase": phase,
            "step": step,
            "workload": f"{trial.trial_id}-g{g}",
            "pages_checked": pages,
            "mismatches": 0,
            "first_mismatch_pages": "",
            "verify_s": 0.5,
            "ts_ns": trial.start_ns + int(b[phase][1] * NS),
            "t_s": b[phase][1],
        }
        for phase, step in checks
        for g in range(trial.fleet_size)
    ]
    return pd.DataFrame(rows, columns=list(integrity.COLUMNS)).astype(
        {"step": "int64", "pages_checked": "int64", "mismatches": "int64", "ts_ns": "int64"}
    )


def _dict_array(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([value]))


@dataclass(frozen=True)
class _Workload:
    """One workload of a lab trial whose pages the walks visit."""

    target: str
    kind: str
    pattern: str
    vmas: int
    mappings: int


MAX_PAGE_SHARING = 256


def workloads(syn: Synthetic) -> list[_Workload]:
    """The lab's shape: a fragmented host copy at each VMA level (distinct pages shared by
    2 copies), optionally a guest-memory pattern process (1 VMA) and a one-content copy."""
    out = [_Workload("pattern-0", "host-process", "distinct", 1, 2)] if syn.pattern_process else []
    out += [
        _Workload(f"fragmented-{i}", "host-copy", "distinct", v, 2)
        for i, v in enumerate(syn.vma_levels)
    ]
    if syn.one_content:
        top = max(syn.vma_levels)
        out.append(_Workload("one-content-0", "host-copy", "one-content", top, MAX_PAGE_SHARING))
    return out


def walk_ns(old: bool, vmas: np.ndarray, mappings: np.ndarray) -> np.ndarray:
    """Nominal walk time (ns): the old walk visits every VMA of the anon_vma for each
    mapping (~0.6 µs per VMA under TCG); the new one goes straight to each mapping's VMA."""
    if old:
        return 1_500.0 + 600.0 * vmas * mappings
    return 1_500.0 + 200.0 * mappings + 0.05 * vmas


def _attributed_chunk(
    syn: Synthetic, trial: _Trial, n: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Walk columns of one trigger: each walk for one workload, a share unattributed."""
    wl = workloads(syn)
    pick = rng.integers(0, len(wl), n)
    vmas = np.array([w.vmas for w in wl])[pick]
    mappings = np.array([w.mappings for w in wl])[pick]
    dur = walk_ns(trial.kernel in syn.old_kernels, vmas, mappings) * rng.lognormal(0, 0.35, n)
    lost = rng.random(n) < syn.unattributed_share
    code = np.where(lost, -1, pick).astype(np.int32)
    mask = lost

    def dictionary(values: list[str], codes: np.ndarray) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(
            pa.array(codes.astype(np.int32), mask=mask), pa.array(values)
        )

    kinds = [*sorted({w.kind for w in wl}), "unattributed"]
    kind_code = np.where(lost, len(kinds) - 1, np.array([kinds.index(w.kind) for w in wl])[pick])
    patterns = sorted({w.pattern for w in wl})
    pattern_code = np.array([patterns.index(w.pattern) for w in wl])[pick]
    return {
        "target": dictionary([w.target for w in wl], code),
        "target_kind": pa.DictionaryArray.from_arrays(kind_code.astype(np.int32), pa.array(kinds)),
        "vmas": pa.array(vmas, mask=mask, type=pa.int64()),
        "mappings": pa.array(mappings, mask=mask, type=pa.int64()),
        "pattern": dictionary(patterns, pattern_code),
        "duration_ns": dur.astype(np.int64),
    }


def _latency_chunks(syn: Synthetic, trials: list[_Trial], rng) -> Iterator[pa.Table]:
    """Walk times per trial, generated and written one trigger at a time (bounded memory)."""
    ok = [t for t in trials if t.status == "successful"]
    per_trial = syn.latency_samples // max(len(ok), 1)
    for trial in ok:
        per_vma_ns = 35_000.0 if trial.kernel in syn.old_kernels else 85.0
        for trigger, share in TRIGGER_SHARE.items():
            n = int(per_trial * share)
            n_proxy = int(n * syn.proxy_share) if trigger == "migrate" else 0
            if syn.attributed:
                cols = _attributed_chunk(syn, trial, n, rng)
            else:
                vmas = np.floor(np.exp(rng.uniform(0, np.log(20_000), n))).astype(np.int64)
                noise = rng.lognormal(0.0, 0.35, n)
                dur = ((1_500.0 + per_vma_ns * vmas) * noise).astype(np.int64)
                cols = {"duration_ns": dur, "vmas": vmas}
            dur = cols["duration_ns"]
            dur[:n_proxy] = (dur[:n_proxy] * 0.6).astype(np.int64)  # the proxy sees less
            method = np.where(np.arange(n) < n_proxy, 1, 0).astype(np.int32)
            yield pa.table(
                {
                    "trial_id": _dict_array(trial.trial_id, n),
                    "kernel": _dict_array(trial.kernel, n),
                    "trigger": _dict_array(trigger, n),
                    "method": pa.DictionaryArray.from_arrays(
                        method, pa.array(["kprobe", "tracepoint-proxy"])
                    ),
                    "lower_bound": pa.array(method == 1),
                    "ts_ns": trial.start_ns + np.sort(rng.integers(90 * NS, 150 * NS, n)),
                    "caller": _dict_array(f"{trigger}_folio", n),
                }
                | cols
            )


def _write_latency(path: Path, syn: Synthetic, trials: list[_Trial], rng) -> None:
    writer: pq.ParquetWriter | None = None
    try:
        for chunk in _latency_chunks(syn, trials, rng):
            if writer is None:
                writer = pq.ParquetWriter(path, chunk.schema)
            writer.write_table(chunk)
    finally:
        if writer is not None:
            writer.close()


def _phase_deltas(vmstat: pd.DataFrame) -> pd.DataFrame:
    v = vmstat.sort_values(["trial_id", "counter", "ts_ns"])
    v = v.assign(delta=v.groupby(["trial_id", "counter"])["value"].diff().fillna(0))
    out = v.groupby(["trial_id", "phase", "counter"], as_index=False)["delta"].sum()
    return out.astype({"delta": "int64"})


def _trial_row(syn: Synthetic, trial: _Trial, ksm: pd.DataFrame | None, rng) -> dict:
    b = _phase_bounds(trial)
    row: dict[str, Any] = {
        "trial_id": trial.trial_id,
        "kernel": trial.kernel,
        "kernel_release": _release(trial.kernel),
        "fleet_size": trial.fleet_size,
        "repeat": trial.repeat,
        "status": trial.status,
        "reason": None,
        "accel": "tcg",
        "guest_memory_mib": syn.guest_memory_mib,
        "workload_mib": syn.workload_mib,
        "settled": False,
        "settle_s": np.nan,
        "baseline_saving_mib": np.nan,
        "predicted_saving_mib": np.nan,
        "measured_saving_mib": np.nan,
        "general_profit_mib": np.nan,
        "pages_sharing": pd.NA,
        "pages_shared": pd.NA,
        "ksmd_cpu_s": np.nan,
        "started_ns": trial.start_ns,
        "ended_ns": trial.start_ns + int(b["teardown"][1] * NS),
        "ksm_setting": trial.ksm.setting if trial.ksm else None,
    }
    if trial.status != "successful" or ksm is None:
        row["reason"] = "guest g1 not ready after 120 s" if trial.status != "successful" else None
        return row
    hold = ksm[ksm["phase"] == "hold"].iloc[-1]
    predicted = (trial.fleet_size - 1) * syn.workload_mib
    row |= {
        "settled": True,
        "settle_s": float(
            (trial.ksm.settle_s if trial.ksm else 5 * trial.fleet_size) * rng.uniform(0.9, 1.2)
        ),
        "baseline_saving_mib": 0.0,
        "predicted_saving_mib": float(predicted),
        "measured_saving_mib": float(hold["pages_sharing"]) / PAGES_PER_MIB,
        "general_profit_mib": float(hold["general_profit_bytes"]) / (1 << 20),
        "pages_sharing": int(hold["pages_sharing"]),
        "pages_shared": int(hold["pages_shared"]),
        "ksmd_cpu_s": float(ksm["ksmd_cpu_s"].iloc[-1]),
    }
    if syn.attributed:
        row["mappings_per_ksm_page"] = (row["pages_sharing"] + row["pages_shared"]) / row[
            "pages_shared"
        ]
    return row


def _write(run_dir: Path, name: str, df: pd.DataFrame) -> None:
    """Table name, held to the run-directory schema as the run store holds its own."""
    table = pa.Table.from_pandas(store.conform(name, df), preserve_index=False)
    pq.write_table(table, run_dir / schema.table(name).file)


def _manifest(syn: Synthetic, trials: list[_Trial], files: dict[str, str]) -> dict[str, Any]:
    return {
        "run_id": syn.run_id,
        "schema_version": schema.SCHEMA_VERSION,
        "spec_name": syn.spec_name,
        "spec": {
            "name": syn.spec_name,
            "kernels": list(syn.kernels),
            "fleet_sizes": list(syn.fleet_sizes),
            "repeats": syn.repeats,
        },
        "spec_sha256": hashlib.sha256(syn.spec_name.encode()).hexdigest(),
        "densitylab_version": "0.1.0",
        "git_commit": None,
        "host": {
            "accel": "tcg",
            "kernel_release": "6.18.0-synthetic",
            "cpus": 2,
            "mem_total_kib": 24 << 20,
        },
        "kernel_release": "6.18.0-synthetic",
        "qemu_version": "7.2.0",
        "libvirt_version": "9.0.0",
        "images": {"guest": {"sha256": "0" * 64}},
        "seed": syn.seed,
        "started_at": "2025-01-01T00:00:00+00:00",
        "ended_at": "2025-01-01T01:00:00+00:00",
        "trials": [
            {
                "trial_id": t.trial_id,
                "kernel": t.kernel,
                "fleet_size": t.fleet_size,
                "repeat": t.repeat,
                "status": t.status,
                "reason": None if t.status == "successful" else "guest g1 not ready after 120 s",
            }
            for t in trials
        ],
        "kernels": [
            {"name": k, "release": _release(k), "origin": "debian", "config_sha256": None}
            for k in syn.kernels
        ],
        "warnings": list(syn.warnings),
        "files": files,
    } | syn.extra_manifest


def _ksm_settings_table(trial: _Trial) -> pd.DataFrame:
    swept = dict(kv.split("=") for kv in trial.ksm.setting.split(",")) if trial.ksm else {}
    knobs = {"pages_to_scan": "2000", "sleep_millisecs": "20"} | swept
    return pd.DataFrame(
        [
            {
                "trial_id": trial.trial_id,
                "knob": k,
                "requested": v,
                "in_force": v,
                "swept": k in swept,
            }
            for k, v in knobs.items()
        ]
    )


def _per_trial_tables(syn: Synthetic, trials: list[_Trial], rng) -> dict[str, pd.DataFrame]:
    """Every table except latency, concatenated over trials."""
    n_ok = sum(t.status == "successful" for t in trials)
    # latency, workload_pages (orchestrator.pagecount) and plays (playbook workloads)
    # are not synthesised
    parts: dict[str, list[pd.DataFrame]] = {
        k: [] for k in ALL_TABLES - {"latency", "workload_pages", "plays"}
    }
    for trial in trials:
        t, phase = _sample_times(syn, trial, n_ok)
        ksm = _ksm_table(syn, trial, t, phase, rng)
        parts["ksm_samples"].append(ksm)
        parts["vmstat_samples"].append(_vmstat_table(syn, trial, ksm))
        parts["process_samples"].append(_process_table(syn, trial, ksm))
        parts["guests"].append(_guests_table(syn, trial, rng))
        parts["events"].append(_events_table(trial))
        parts["integrity"].append(_integrity_table(syn, trial))
        parts["ksm_settings"].append(_ksm_settings_table(trial))
        ok = trial.status == "successful"
        parts["trials"].append(pd.DataFrame([_trial_row(syn, trial, ksm if ok else None, rng)]))
    tables = {k: pd.concat(v, ignore_index=True) for k, v in parts.items() if k != "phase_deltas"}
    tables["trials"] = tables["trials"].astype({"pages_sharing": "Int64", "pages_shared": "Int64"})
    tables["phase_deltas"] = _phase_deltas(tables["vmstat_samples"])
    return tables


def make_run(parent: Path, syn: Synthetic | None = None, **overrides: Any) -> Path:
    """Write a synthetic run directory under parent and return its path.

    Keyword overrides replace fields of syn (default Synthetic()).
    """
    syn = replace(syn or Synthetic(), **overrides)
    rng = np.random.default_rng(syn.seed)
    run_dir = parent / syn.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    trials = _plan(syn)
    for name, df in _per_trial_tables(syn, trials, rng).items():
        if name in syn.tables:
            _write(run_dir, name, df)
    if "latency" in syn.tables and syn.latency_samples > 0:
        _write_latency(run_dir / schema.LATENCY.file, syn, trials, rng)
    files = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.glob("*.parquet"))
    }
    manifest = _manifest(syn, trials, files)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return run_dir
