"""A trial's state as the run store's tables (one schema, whatever host it ran on)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import pandas as pd

from orchestrator import sampling
from orchestrator.attribution import Target, attribute, group_target, pattern_mappings
from orchestrator.engine.state import TrialResult, TrialState
from orchestrator.hosts.base import Proc

FILL_FIELDS = ("fill_s", "dup_pages", "zero_pages", "unique_pages", "volatile_pages", "vmas")


def ksmd_cpu_delta(samples: list[dict[str, Any]]) -> float | None:
    """ksmd CPU seconds between the first and the last sample that has them."""
    cpu = [s["ksmd_cpu_s"] for s in samples if s.get("ksmd_cpu_s") is not None]
    return (cpu[-1] - cpu[0]) if len(cpu) >= 2 else None


def finish_result(st: TrialState, res: TrialResult) -> None:
    res.ksmd_cpu_s = ksmd_cpu_delta(st.samples)
    res.ended_ns = time.monotonic_ns()


def guests_table(st: TrialState, tid: str) -> pd.DataFrame:
    """One row per fleet member: a guest (boot figures) or a pattern process."""
    fills = {f.guest: f for f in st.fills}
    rows = [
        {
            "trial_id": tid,
            "guest": g.name,
            "workload_kind": "guest",
            "pid": g.pid,
            "boot_s": g.boot_s,
            "ready_s": g.ready_s,
            "boot_retries": g.boot_retries,
            **(
                {k: v for k, v in asdict(fills[g.name]).items() if k != "guest"}
                if g.name in fills
                else {}
            ),
        }
        for g in st.guests
    ]
    rows += [
        {
            "trial_id": tid,
            "guest": p.name,
            "workload_kind": p.kind,
            "pid": p.pid,
            **{k: p.done.get(k) for k in FILL_FIELDS},
        }
        for p in st.fleet_procs
    ]
    return pd.DataFrame(rows)


def trial_tables(st: TrialState, res: TrialResult) -> dict[str, pd.DataFrame]:
    tid = res.trial_id
    events = pd.DataFrame(st.events, columns=["ts_ns", "t_s", "phase", "event", "detail"])
    events.insert(0, "trial_id", tid)
    procs = sampling.process_table(st.samples, tid, st.t0_ns, st.marks)
    tables = {
        "ksm_samples": sampling.ksm_table(st.samples, tid, st.t0_ns, st.marks),
        "vmstat_samples": sampling.vmstat_table(st.samples, tid, st.t0_ns, st.marks),
        "process_samples": procs,
        "guests": guests_table(st, tid),
        "events": events,
        "phase_deltas": sampling.phase_deltas(st.samples, tid, st.marks),
        "integrity": st.integrity.table(tid, st.t0_ns),
        "ksm_settings": ksm_settings_table(st, tid),
    }
    if st.plays:
        tables["plays"] = pd.DataFrame([{"trial_id": tid, **asdict(p)} for p in st.plays])
    if st.collected:
        tables["latency"] = latency_table(st, res, procs)
        res.walks = len(tables["latency"])
    tables["trials"] = pd.DataFrame([asdict(res)])
    return tables


def ksm_settings_table(st: TrialState, tid: str) -> pd.DataFrame:
    """One row per knob the trial applied: the value asked for, the value the host
    reported in force before the merge (empty when the trial ended before), swept or not."""
    rows = [
        {
            "trial_id": tid,
            "knob": name,
            "requested": value,
            "in_force": st.ksm_knobs.get(name),
            "swept": name in st.ksm_swept,
        }
        for name, value in st.ksm_requested.items()
    ]
    return pd.DataFrame(rows, columns=["trial_id", "knob", "requested", "in_force", "swept"])


def latency_table(st: TrialState, res: TrialResult, procs: pd.DataFrame) -> pd.DataFrame:
    """Latency samples labelled with their trigger, method, and the workload whose page
    each walk was for (see orchestrator.attribution)."""
    lat = st.latency if st.latency is not None else pd.DataFrame(columns=["ts_ns", "duration_ns"])
    lat = lat.copy()
    lat.insert(0, "trial_id", res.trial_id)
    lat.insert(1, "kernel", res.kernel)
    lat.insert(2, "trigger", sampling.label_phases(lat["ts_ns"], st.marks) if len(lat) else [])
    lat["t_s"] = (lat["ts_ns"] - st.t0_ns) / 1e9
    return attribute(lat, st.windows, targets(st, procs))


def proc_target(p: Proc, copies: int, mps: int) -> Target:
    """A workload process as a latency target: its own VMA count (from dlfill's done
    line) and the mappings its pattern gives each KSM page."""
    maps = pattern_mappings(p.pattern, int(p.done.get("dup_pages") or 0), copies, mps)
    return Target(p.name, p.kind, p.pattern, p.done.get("vmas"), maps)


def targets(st: TrialState, procs: pd.DataFrame) -> dict[str, Target]:
    """Guests (their mergeable VMAs as sampled), pattern processes and host copies as
    latency targets; host copies that share a cgroup are reclaimed as one, and that
    group is a target too."""
    mps = int(st.ksm_knobs.get("max_page_sharing", 256))
    own = procs.groupby("guest")["ram_vmas"].max() if len(procs) else pd.Series(dtype=int)
    out: dict[str, Target] = {}
    dup = min((f.dup_pages for f in st.fills), default=0)
    for g in st.guests:
        vmas = int(own[g.name]) if g.name in own.index and pd.notna(own[g.name]) else None
        maps = pattern_mappings(st.guest_pattern, dup, len(st.guests), mps)
        out[g.name] = Target(g.name, "guest", st.guest_pattern, vmas, maps)
    for p in st.fleet_procs:
        out[p.name] = proc_target(p, len(st.fleet_procs), mps)
    copies = [proc_target(p, len(st.host_procs), mps) for p in st.host_procs]
    out.update({t.name: t for t in copies})
    shared = {p.cgroup for p in st.host_procs}
    if len(copies) > 1 and len(shared) == 1:
        name = "+".join(sorted(t.name for t in copies))
        out[name] = group_target(name, copies)
    return out
