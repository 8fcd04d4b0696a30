"""The trial runner: spec -> trials -> (host, fleet, workload, samples) -> run store.

Every resource goes onto an ExitStack the moment it exists (KSM knobs, domains, the
workload, the sampler), so teardown runs LIFO on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from orchestrator import (
    __version__,
    abdiff,
    checks,
    fleet,
    hostagent,
    images,
    integrity,
    labrun,
    pagecount,
    plan,
    runlock,
    sampling,
    store,
    triggers,
)
from orchestrator.attribution import (
    Target,
    Window,
    attribute,
    group_target,
    measured_mappings,
    pattern_mappings,
)
from orchestrator.errors import DensitylabError, HostError, Interrupted, UsageError
from orchestrator.interrupts import InterruptGuard, TeardownStack
from orchestrator.kernelspec import label_of, labels
from orchestrator.manifest import load_manifest
from orchestrator.sampling import Collector, PhaseMark, Sampler, settled, sharing_pages
from orchestrator.spec import Spec, check_fits_host, load_spec
from orchestrator.workload import FillResult, PlayError, WorkloadDriver

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
PAGES_PER_MIB = 256


class Progress(Protocol):
    """What the runner tells a front end (the CLI draws it with rich; tests ignore it)."""

    def phase(self, trial_id: str, phase: str) -> None: ...
    def guest_event(self, guest: str, event: str) -> None: ...
    def merge(self, sharing_mib: float, target_mib: float | None, full_scans: int) -> None: ...


class QuietProgress:
    def phase(self, trial_id: str, phase: str) -> None:
        log.info("%s: %s", trial_id, phase)

    def guest_event(self, guest: str, event: str) -> None:
        pass

    def merge(self, sharing_mib: float, target_mib: float | None, full_scans: int) -> None:
        pass


@dataclass
class TrialResult:
    """One row of trials.parquet."""

    trial_id: str
    kernel: str
    kernel_release: str
    fleet_size: int
    repeat: int
    accel: str
    guest_memory_mib: int
    workload_mib: int
    status: str = "failed"
    reason: str | None = None
    settled: bool = False
    settle_s: float | None = None
    baseline_settled: bool | None = None
    baseline_saving_mib: float = 0.0
    predicted_saving_mib: float | None = None
    total_saving_mib: float | None = None
    residual_saving_mib: float | None = None
    pre_scramble_saving_mib: float | None = None  # sharing just before the scramble
    attributed: bool = False
    measured_saving_mib: float | None = None
    pagecount_saving_mib: float | None = None  # orchestrator.pagecount, after the merge
    saving_method: str | None = None  # "pagemap" when pagecount_saving_mib is measured
    general_profit_mib: float | None = None
    pages_sharing: int | None = None
    pages_shared: int | None = None
    ksmd_cpu_s: float | None = None
    latency_method: str | None = None
    latency_notes: str | None = None
    walks: int | None = None
    mappings_per_ksm_page: float | None = None  # measured at the end of the merge
    started_ns: int = 0
    ended_ns: int = 0


@dataclass
class SettleResult:
    settled: bool
    seconds: float
    sample: dict[str, Any]


@dataclass
class TrialState:
    """What a trial accumulates while it runs, turned into tables at the end."""

    t0_ns: int = field(default_factory=time.monotonic_ns)
    marks: list[PhaseMark] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    fills: list[FillResult] = field(default_factory=list)
    guests: list[fleet.Guest] = field(default_factory=list)
    host_procs: list[triggers.HostProcess] = field(default_factory=list)
    sampler: Sampler | None = None
    collector: Collector | None = None
    windows: list[Window] = field(default_factory=list)  # one workload acted on at a time
    ksm_knobs: dict[str, str] = field(default_factory=dict)  # as in force during the merge
    guest_pattern: str = "distinct"
    integrity: integrity.IntegrityLog = field(default_factory=integrity.IntegrityLog)

    def event(self, phase: str, event: str, detail: str = "") -> None:
        ts = time.monotonic_ns()
        self.events.append(
            {
                "ts_ns": ts,
                "t_s": (ts - self.t0_ns) / 1e9,
                "phase": phase,
                "event": event,
                "detail": detail,
            }
        )


# ---------------------------------------------------------------- predictions


def merged_saving(copies: int, max_page_sharing: int) -> int:
    """Pages saved when `copies` identical pages merge: KSM keeps one page per
    max_page_sharing sharers (a chain of duplicates beyond that)."""
    return copies - math.ceil(copies / max_page_sharing) if copies > 1 else 0


def pattern_saving(pattern: str, dup_pages: int, copies: int, max_page_sharing: int) -> int:
    """Pages saved on `copies` processes of `dup_pages` duplicate pages each: distinct
    pages merge index by index across the copies; one-content pages all merge together
    (within a process too), in chains of max_page_sharing."""
    if pattern == "one-content":
        return merged_saving(dup_pages * copies, max_page_sharing)
    return dup_pages * merged_saving(copies, max_page_sharing)


def predicted_saving_pages(
    fills: list[FillResult],
    use_zero_pages: bool,
    max_page_sharing: int = 256,
    pattern: str = "distinct",
) -> int:
    """Pages KSM should save for this pattern across the fleet.

    Duplicate page i is identical in every guest and distinct from the guest's other
    pages, so each index merges its N copies (or, one-content, every duplicate page
    merges with every other). Zero pages all merge together (or, with use_zero_pages,
    each maps the zero page). Unique and volatile pages never merge.
    """
    if not fills:
        return 0
    dup = pattern_saving(pattern, min(f.dup_pages for f in fills), len(fills), max_page_sharing)
    zero = sum(f.zero_pages for f in fills)
    return dup + (zero if use_zero_pages else merged_saving(zero, max_page_sharing))


# ---------------------------------------------------------------- waits


def new_samples(
    sampler: Sampler, guard: InterruptGuard, timeout_s: float, poll_s: float
) -> Iterator[list[dict[str, Any]]]:
    """Batches of samples the sampler writes from now on (often empty), until timeout_s;
    checks for a stop request between polls."""
    start = time.monotonic()
    n_read = len(sampler.poll())
    while time.monotonic() - start <= timeout_s:
        guard.check()
        fresh = sampler.poll()[n_read:]
        n_read += len(fresh)
        yield fresh
        time.sleep(poll_s)


def wait_settled(
    sampler: Sampler,
    guard: InterruptGuard,
    spec: Spec,
    timeout_s: float,
    on_sample: Callable[[dict[str, Any]], None],
) -> SettleResult:
    """Wait until KSM sharing moves less than settle_pct over settle_scans full scans.

    Compares the newest sample with the newest one taken at least settle_scans full
    scans earlier, both inside this wait, so a settle always reflects memory as it is
    now, however many scans fit between two samples. Returns whether it settled or the
    timeout ended it.
    """
    m = spec.phases.merge
    start = time.monotonic()
    seen: list[tuple[int, int]] = []  # (full_scans, sharing pages) of samples in this wait
    last: dict[str, Any] = {}
    for fresh in new_samples(sampler, guard, timeout_s, min(0.25, spec.sampling.interval_s / 2)):
        for s in fresh:
            last = s
            on_sample(s)
            seen.append((int(s["ksm"].get("full_scans", 0)), sharing_pages(s)))
        if seen and settled(seen, m.settle_scans, m.settle_pct):
            return SettleResult(True, time.monotonic() - start, last)
    return SettleResult(False, time.monotonic() - start, last)


def hold(sampler: Sampler, guard: InterruptGuard, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        guard.check()
        sampler.poll()
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


# ---------------------------------------------------------------- the run


@dataclass
class RunContext:
    spec: Spec
    spec_path: Path
    store: store.RunStore
    image: images.TinyImage
    conn: Any
    domain_type: str
    facts: dict[str, Any]
    guard: InterruptGuard
    progress: Progress


def guest_specs(ctx: RunContext, trial: plan.Trial, token: str) -> list[fleet.GuestSpec]:
    img = fleet.GuestImage(kernel=ctx.image.kernel, initrd=ctx.image.initrd)
    logs = ctx.store.trial_dir(trial.trial_id) / "console"
    return [
        fleet.GuestSpec(
            name=f"dl-{token}-{trial.fleet_size}-{trial.repeat}-g{i}",
            memory_mib=ctx.spec.fleet.memory_mib,
            vcpus=ctx.spec.fleet.vcpus,
            image=img,
            console_log=logs / f"g{i}.log",
        )
        for i in range(trial.fleet_size)
    ]


def ksm_saved_path(run_id: str) -> Path:
    return hostagent.STATE_DIR / f"ksm-{run_id}.json"


def adopt_saved_ksm(run_id: str) -> list[str]:
    """Make the host's original KSM knobs, saved by runs whose owner is gone, this run's.

    A killed run leaves its knobs in force and the host's own values in its saved file;
    reading the knobs now would save the killed run's values as the host's (what a
    resume after SIGKILL did once: the host's values were lost). So the originals are
    moved over, never re-read: the oldest save wins per knob, and apply_ksm only adds
    knobs no save has. Returns the run ids adopted from. Call with the run lock held.
    """
    mine = ksm_saved_path(run_id)
    with runlock.host_mutex():
        gone = [
            p
            for r, p in hostagent.state_files("ksm", hostagent.STATE_DIR).items()
            if r != run_id and not runlock.inspect(runlock.lock_path(r)).live
        ]
        if not gone:
            return []
        files = sorted([*gone, *([mine] if mine.exists() else [])], key=lambda p: p.stat().st_mtime)
        saves = [json.loads(p.read_text()) for p in files]
        knobs: dict[str, str] = {}
        for data in reversed(saves):  # older saves overwrite newer ones
            knobs.update(data["knobs"])
        hostagent.write_json_atomic(mine, {"ksm_dir": saves[0]["ksm_dir"], "knobs": knobs})
        for p in gone:
            p.unlink()
    adopted = [p.stem.removeprefix("ksm-") for p in gone]
    log.warning("KSM: adopted the host's saved knobs from run(s) %s", ", ".join(adopted))
    return adopted


def restore_ksm_or_raise(path: Path) -> None:
    errors = hostagent.restore_ksm(path)
    if errors:
        raise HostError("KSM restore: " + "; ".join(errors))


def set_ksm_run(value: int) -> None:
    hostagent.write_knob(hostagent.KSM_DIR, "run", str(value))


def run_phases(ctx: RunContext, trial: plan.Trial, st: TrialState, res: TrialResult) -> None:
    """Boot, baseline, fill, merge, hold; resources are torn down when this returns."""
    spec, run_id = ctx.spec, ctx.store.run_id

    def phase(name: str) -> None:
        st.marks.append(PhaseMark(name, time.monotonic_ns()))
        st.event(name, "phase-start")
        ctx.progress.phase(trial.trial_id, name)

    with TeardownStack(ctx.guard) as stack:
        saved = ksm_saved_path(run_id)
        hostagent.apply_ksm({**spec.ksm, "run": 0}, saved)
        stack.callback(restore_ksm_or_raise, saved)
        st.host_procs = triggers.start_host_workload(
            spec.host_workload,
            trial.vmas,
            spec.host_workload_seed,
            run_id,
            stack,
            ctx.store.trial_dir(trial.trial_id),
        )
        st.integrity.add_source(lambda: integrity.verify_host_workload(st.host_procs))
        fl = stack.enter_context(fleet.Fleet(ctx.conn, run_id, trial.trial_id, ctx.domain_type))
        phase("boot")
        token = run_id.rsplit("-", 1)[-1] + f"{int(time.time()) % 100000:05d}"
        fl.define(guest_specs(ctx, trial, token))
        st.guests = list(fl.guests)  # the fleet clears its own list at teardown
        fl.start_all()
        pids = {g.name: g.pid for g in fl.guests if g.pid is not None}
        pids.update({f"host-dlfill-{i}": p.pid for i, p in enumerate(st.host_procs)})
        st.sampler = stack.enter_context(
            Sampler(
                ctx.store.trial_dir(trial.trial_id) / "samples.jsonl",
                pids,
                spec.sampling.interval_s,
            )
        )
        fl.wait_ready(spec.phases.boot.timeout_s)
        st.event("boot", "fleet-ready", f"{len(fl.guests)} guests")
        merge_phases(ctx, trial, st, res, stack, phase, fl)
        phase("teardown")


def merge_phases(
    ctx: RunContext,
    trial: plan.Trial,
    st: TrialState,
    res: TrialResult,
    stack: ExitStack,
    phase: Callable[[str], None],
    fl: fleet.Fleet,
) -> None:
    spec = ctx.spec
    assert st.sampler is not None
    sampler = st.sampler

    def on_sample(s: dict[str, Any]) -> None:
        ctx.progress.merge(
            sharing_pages(s) / PAGES_PER_MIB,
            res.predicted_saving_mib,
            int(s["ksm"].get("full_scans", 0)),
        )

    baseline_pages = 0
    set_ksm_run(1)
    if spec.phases.baseline.enabled:
        phase("baseline")
        b = wait_settled(sampler, ctx.guard, spec, spec.phases.baseline.timeout_s, on_sample)
        baseline_pages = sharing_pages(b.sample) if b.sample else 0
        res.baseline_settled = b.settled
        res.baseline_saving_mib = baseline_pages / PAGES_PER_MIB
        st.event("baseline", "settled" if b.settled else "timeout", f"{b.seconds:.1f}s")
    phase("fill")
    driver, st.fills = fill_guests(ctx, trial, st, stack, fl)
    knobs = st.ksm_knobs = hostagent.read_ksm_knobs()
    st.guest_pattern = spec.workload.pattern
    mps = int(knobs.get("max_page_sharing", 256))
    guest_pages = predicted_saving_pages(
        st.fills, knobs.get("use_zero_pages") == "1", mps, spec.workload.pattern
    )
    # Host copies share every page with each other (dup 1.0, same seed).
    host_pages = (
        pattern_saving(
            spec.host_workload.pattern,
            int(st.host_procs[0].done["dup_pages"]),
            len(st.host_procs),
            mps,
        )
        if st.host_procs
        else 0
    )
    res.predicted_saving_mib = (guest_pages + host_pages) / PAGES_PER_MIB
    phase("merge")
    m = wait_settled(sampler, ctx.guard, spec, spec.phases.merge.timeout_s, on_sample)
    res.settled, res.settle_s = m.settled, m.seconds
    st.event("merge", "settled" if m.settled else "timeout", f"{m.seconds:.1f}s")
    verify(ctx, st, "merge")
    pagecount.record(ctx.store, trial.trial_id, fl, st.fills, res)
    if m.sample:
        k = m.sample["ksm"]
        res.total_saving_mib = sharing_pages(m.sample) / PAGES_PER_MIB
        res.general_profit_mib = int(k.get("general_profit", 0)) / MIB
        res.pages_sharing, res.pages_shared = k.get("pages_sharing"), k.get("pages_shared")
        res.mappings_per_ksm_page = measured_mappings(res.pages_sharing, res.pages_shared)
    phase("hold")
    hold(sampler, ctx.guard, spec.phases.hold.duration_s)
    trigger_phases(ctx, st, res, fl, phase)
    if spec.phases.attribute.enabled and res.total_saving_mib is not None:
        attribute_saving(ctx, st, res, driver, phase, on_sample)
    elif res.total_saving_mib is not None:
        # Without the scramble, the best estimate subtracts the idle fleet's sharing.
        res.measured_saving_mib = res.total_saving_mib - res.baseline_saving_mib


def trigger_phases(
    ctx: RunContext, st: TrialState, res: TrialResult, fl: fleet.Fleet, phase: Callable[[str], None]
) -> None:
    """Migrate and reclaim while KSM pages exist, timing rmap_walk_ksm meanwhile.

    Collector, swap and cgroup limits live on a stack of their own, so they are gone
    before the attribute phase (and, on error, before the fleet is torn down)."""
    p = ctx.spec.phases
    wanted = [t for t, on in (("migrate", p.migrate.enabled), ("reclaim", p.reclaim.enabled)) if on]
    if not wanted:
        return
    assert st.sampler is not None
    plan_ = triggers.pick_latency(ctx.spec.latency.method, ctx.facts["tracing"]["value"], wanted)
    res.latency_method = plan_.method
    res.latency_notes = "; ".join(f"{t}: {n}" for t, n in plan_.notes.items()) or None
    targets = {g.name: g.pid for g in fl.guests if g.pid}
    targets.update({f"host-dlfill-{i}": h.pid for i, h in enumerate(st.host_procs)})
    with TeardownStack(ctx.guard) as stack:
        if plan_.method is not None:
            st.collector = stack.enter_context(
                Collector(
                    ctx.store.trial_dir(res.trial_id) / "latency.jsonl",
                    plan_.method,
                    ctx.store.run_id.replace("-", "_"),
                )
            )
        for i in range(p.migrate.repeats if p.migrate.enabled else 0):
            phase("migrate")
            st.windows += triggers.migrate_once(
                p.migrate,
                int(ctx.facts["numa"]["value"]),
                targets,
                i,
                lambda e, d: st.event("migrate", e, d),
                ctx.store.run_id,
            )
            hold(st.sampler, ctx.guard, p.migrate.settle_s)
            verify(ctx, st, "migrate", i)
        if p.reclaim.enabled:
            triggers.provide_swap(
                p.reclaim, ctx.store.run_id, stack, lambda e, d: st.event("reclaim", e, d)
            )
            for j in range(p.reclaim.repeats):
                phase("reclaim")
                st.windows += triggers.reclaim_once(
                    p.reclaim,
                    str(ctx.facts["cgroup"]["value"]),
                    targets,
                    stack,
                    lambda e, d: st.event("reclaim", e, d),
                )
                hold(st.sampler, ctx.guard, p.reclaim.settle_s)
                verify(ctx, st, "reclaim", j)
        phase("restore")
    if p.reclaim.enabled:  # after the stack: swap is off, every swapped page came back in
        verify(ctx, st, "restore")


def attribute_saving(
    ctx: RunContext,
    st: TrialState,
    res: TrialResult,
    driver: WorkloadDriver,
    phase: Callable[[str], None],
    on_sample: Callable[[dict[str, Any]], None],
) -> None:
    """Scramble the workload's pages and let KSM settle: the saving that disappears is
    the workload's; what stays (boot leftovers, page cache) is the residual.

    The total is the merge's settled sharing, not the sharing just before the scramble:
    reclaim and migration in between unmerge pages that KSM has not all merged again
    yet (a pre-scramble total read 18% low after reclaim in CI). Known shortfall (the
    demo reads 4-6% low): right after the scramble the guests' leftover sharing jumps
    (per guest +0 to +2,060 merging pages within one scan, measured), and that jump
    lands in the residual."""
    assert st.sampler is not None
    phase("attribute")
    before = st.sampler.latest()
    if before:  # recorded beside the total, for the shortfall above
        res.pre_scramble_saving_mib = sharing_pages(before) / PAGES_PER_MIB
    with ctx.guard.deferred():
        driver.scramble()
        triggers.scramble_host_workload(st.host_procs)
    ctx.guard.check()
    a = wait_settled(
        st.sampler, ctx.guard, ctx.spec, ctx.spec.phases.attribute.timeout_s, on_sample
    )
    st.event("attribute", "settled" if a.settled else "timeout", f"{a.seconds:.1f}s")
    if a.sample and res.total_saving_mib is not None:
        res.residual_saving_mib = sharing_pages(a.sample) / PAGES_PER_MIB
        res.measured_saving_mib = res.total_saving_mib - res.residual_saving_mib
        res.attributed = a.settled
    verify(ctx, st, "attribute")


def verify(ctx: RunContext, st: TrialState, phase: str, step: int = 0) -> None:
    """Check every workload page against its pattern; IntegrityError on a wrong page."""
    ctx.guard.check()
    results = st.integrity.check(phase, step)
    pages = sum(v.pages for v in results)
    st.event(phase, "integrity-verified", f"step {step}: {pages} pages, 0 corrupted")


def fill_guests(
    ctx: RunContext, trial: plan.Trial, st: TrialState, stack: ExitStack, fl: fleet.Fleet
) -> tuple[WorkloadDriver, list[FillResult]]:
    """Start the workload everywhere and wait for it, stopping early if the host runs short."""
    spec = ctx.spec
    assert st.sampler is not None
    sampler = st.sampler
    short: list[str] = []

    def cancel() -> bool:
        s = sampler.latest()
        avail_mib = s["meminfo_kib"].get("MemAvailable", 1 << 40) / 1024 if s else 1 << 30
        if avail_mib < spec.host_reserve_mib and not short:
            short.append(
                f"host memory reserve reached: MemAvailable {avail_mib:.0f} MiB < "
                f"host_reserve_mib {spec.host_reserve_mib}"
            )
        return bool(short) or ctx.guard.requested

    driver = WorkloadDriver(
        [g.name for g in fl.guests],
        ctx.store.trial_dir(trial.trial_id) / "ansible",
        fleet.URI,
        on_event=ctx.progress.guest_event,
        cancel=cancel,
    )
    stack.callback(driver.stop)
    st.integrity.add_source(driver.verify)
    seed = spec.workload_seed
    try:
        with ctx.guard.deferred():
            driver.start(spec.workload, seed, spec.phases.fill.timeout_s)
            results = driver.wait_filled(spec.workload, seed, spec.phases.fill.timeout_s)
    except PlayError as e:
        ctx.guard.check()
        if short:
            raise HostError(short[0]) from e
        raise
    for r in results:
        st.event("fill", "fill-done", f"{r.guest} {r.fill_s:.2f}s")
    return driver, results


def trial_tables(st: TrialState, res: TrialResult) -> dict[str, pd.DataFrame]:
    samples = st.sampler.samples if st.sampler else []
    tid = res.trial_id
    fills = {f.guest: f for f in st.fills}
    guests = pd.DataFrame(
        [
            {
                "trial_id": tid,
                "guest": g.name,
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
    )
    events = pd.DataFrame(st.events, columns=["ts_ns", "t_s", "phase", "event", "detail"])
    events.insert(0, "trial_id", tid)
    procs = sampling.process_table(samples, tid, st.t0_ns, st.marks)
    tables = {
        "trials": pd.DataFrame([asdict(res)]),
        "ksm_samples": sampling.ksm_table(samples, tid, st.t0_ns, st.marks),
        "vmstat_samples": sampling.vmstat_table(samples, tid, st.t0_ns, st.marks),
        "process_samples": procs,
        "guests": guests,
        "events": events,
        "phase_deltas": sampling.phase_deltas(samples, tid, st.marks),
        "integrity": st.integrity.table(tid, st.t0_ns),
    }
    if st.collector is not None:
        tables["latency"] = latency_table(st, res, procs)
        res.walks = len(tables["latency"])
        tables["trials"] = pd.DataFrame([asdict(res)])
    return tables


def latency_table(st: TrialState, res: TrialResult, procs: pd.DataFrame) -> pd.DataFrame:
    """Latency samples labelled with their trigger, method, and the workload whose page
    each walk was for (see orchestrator.attribution)."""
    assert st.collector is not None
    lat = st.collector.samples()
    lat.insert(0, "trial_id", res.trial_id)
    lat.insert(1, "kernel", res.kernel)
    lat.insert(2, "trigger", sampling.label_phases(lat["ts_ns"], st.marks) if len(lat) else [])
    lat["t_s"] = (lat["ts_ns"] - st.t0_ns) / 1e9
    return attribute(lat, st.windows, local_targets(st, procs))


def local_targets(st: TrialState, procs: pd.DataFrame) -> dict[str, Target]:
    """Guests (their mergeable VMAs as sampled) and host copies (from dlfill's done line)
    as latency targets; host copies share a cgroup, so reclaim also names them as one."""
    mps = int(st.ksm_knobs.get("max_page_sharing", 256))
    own = procs.groupby("guest")["ram_vmas"].max() if len(procs) else pd.Series(dtype=int)
    out: dict[str, Target] = {}
    dup = min((f.dup_pages for f in st.fills), default=0)
    for g in st.guests:
        vmas = int(own[g.name]) if g.name in own.index and pd.notna(own[g.name]) else None
        maps = pattern_mappings(st.guest_pattern, dup, len(st.guests), mps)
        out[g.name] = Target(g.name, "guest", st.guest_pattern, vmas, maps)
    copies = []
    for i, h in enumerate(st.host_procs):
        pattern = "one-content" if h.done.get("one_content") else "distinct"
        maps = pattern_mappings(pattern, int(h.done["dup_pages"]), len(st.host_procs), mps)
        copies.append(Target(f"host-dlfill-{i}", "host-copy", pattern, h.done.get("vmas"), maps))
    out.update({t.name: t for t in copies})
    if len(copies) > 1:
        name = "+".join(sorted(t.name for t in copies))
        out[name] = group_target(name, copies)
    return out


def ksmd_cpu_delta(samples: list[dict[str, Any]]) -> float | None:
    """ksmd CPU seconds between the first and the last sample that has them."""
    cpu = [s["ksmd_cpu_s"] for s in samples if s.get("ksmd_cpu_s") is not None]
    return (cpu[-1] - cpu[0]) if len(cpu) >= 2 else None


def finish_result(st: TrialState, res: TrialResult) -> None:
    samples = st.sampler.samples if st.sampler else []
    res.ksmd_cpu_s = ksmd_cpu_delta(samples)
    res.ended_ns = time.monotonic_ns()


def finish_lab_result(
    lab: labrun.LabState, res: TrialResult, tables: dict[str, pd.DataFrame]
) -> None:
    """Trial figures of a lab trial from its samples (the lab host's own clock)."""
    res.ksmd_cpu_s = ksmd_cpu_delta(lab.samples)
    res.settled = bool(lab.result.get("settled"))
    res.latency_method = lab.result.get("latency_method")
    res.latency_notes = lab.result.get("latency_notes")
    res.walks = len(tables["latency"])
    res.accel = res.accel + "+labvm"
    merged = (
        [
            s
            for s, p in zip(
                lab.samples,
                sampling.label_phases(
                    pd.Series([x["ts_ns"] for x in lab.samples], dtype="int64"), lab.marks
                ),
                strict=True,
            )
            if p == "merge"
        ]
        if lab.samples
        else []
    )
    if merged:
        k = merged[-1]["ksm"]
        res.total_saving_mib = sharing_pages(merged[-1]) / PAGES_PER_MIB
        res.measured_saving_mib = res.total_saving_mib
        res.general_profit_mib = int(k.get("general_profit", 0)) / MIB
        res.pages_sharing, res.pages_shared = k.get("pages_sharing"), k.get("pages_shared")
        res.mappings_per_ksm_page = measured_mappings(res.pages_sharing, res.pages_shared)
    res.settle_s = lab.result.get("settle_s")
    res.predicted_saving_mib = lab_prediction(lab) / PAGES_PER_MIB
    res.ended_ns = time.monotonic_ns()


def lab_prediction(lab: labrun.LabState) -> int:
    """Predicted saving (pages) of a lab trial: the pattern processes like guests, the
    fragmented copies like the host workload."""
    fills = lab.result.get("fills", {})
    knobs = lab.result.get("ksm_knobs", {})
    mps = int(knobs.get("max_page_sharing", 256))
    pattern = [
        FillResult(
            n,
            float(d["fill_s"]),
            d["dup_pages"],
            d["zero_pages"],
            d["unique_pages"],
            d["volatile_pages"],
            d["vmas"],
        )
        for n, d in fills.items()
        if n.startswith("pattern-")
    ]
    copies = [d for n, d in fills.items() if n.startswith("fragmented-")]
    patterns = lab.result.get("patterns", {})
    copy_pattern = next((patterns[n] for n in fills if n.startswith("fragmented-")), "distinct")
    fill_pattern = next((patterns[n] for n in fills if n.startswith("pattern-")), "distinct")
    host = pattern_saving(copy_pattern, copies[0]["dup_pages"], len(copies), mps) if copies else 0
    zero_pages = knobs.get("use_zero_pages") == "1"
    return predicted_saving_pages(pattern, zero_pages, mps, fill_pattern) + host


def run_trial(
    ctx: RunContext, trial: plan.Trial, on_result: Callable[[TrialResult], None]
) -> TrialResult:
    """Run one trial and store its tables, whatever its outcome. Re-raises Interrupted
    after on_result has seen the canceled result."""
    st = TrialState()
    res = TrialResult(
        trial.trial_id,
        trial.kernel,
        os.uname().release,
        trial.fleet_size,
        trial.repeat,
        ctx.domain_type,
        ctx.spec.fleet.memory_mib,
        ctx.spec.workload.mib,
        started_ns=st.t0_ns,
    )
    interrupted: Interrupted | None = None
    lab = None
    try:
        if ctx.spec.host.kind == "labvm":
            lab = labrun.LabState()
            labrun.run_lab_trial(ctx, trial, res, lab)
        else:
            run_phases(ctx, trial, st, res)
        res.status, res.reason = "successful", None
    except Interrupted as e:
        res.status, res.reason, interrupted = "canceled", str(e), e
    except DensitylabError as e:
        if ctx.guard.signum is not None:  # failed because it was stopping (a canceled play)
            interrupted = Interrupted(ctx.guard.signum)
            res.status, res.reason = "canceled", f"{interrupted} ({e})"
        else:
            res.status, res.reason = "failed", str(e)
            log.error("%s failed: %s", trial.trial_id, e)
    except Exception as e:  # a bug: still record the trial (teardown already ran)
        res.status, res.reason = "failed", f"internal error: {type(e).__name__}: {e}"
        log.exception("%s failed with an internal error", trial.trial_id)
    if lab is not None:
        tables = labrun.lab_tables(lab, res)
        finish_lab_result(lab, res, tables)
        tables["trials"] = pd.DataFrame([asdict(res)])
    else:
        finish_result(st, res)
        tables = trial_tables(st, res)
    ctx.store.write_trial_tables(trial.trial_id, tables)
    on_result(res)
    if interrupted is not None:
        raise interrupted
    return res


# ---------------------------------------------------------------- experiments


def host_available_mib() -> int:
    return hostagent.read_meminfo_kib().get("MemAvailable", 0) // 1024


def pick_domain_type(requested: str, facts: dict[str, Any]) -> str:
    """libvirt domain type for the spec's accel: auto picks KVM only where it boots guests."""
    probed = facts["accel"]["value"]
    if requested == "auto":
        return "kvm" if probed == "kvm" else "qemu"
    if requested == "kvm" and probed != "kvm":
        raise UsageError(f"fleet.accel: kvm requested but {facts['accel']['how']}")
    return "kvm" if requested == "kvm" else "qemu"


def new_manifest(
    spec_path: Path,
    raw: dict[str, Any],
    spec_sha: str,
    spec: Spec,
    facts: dict[str, Any],
    image: images.TinyImage,
    run_id: str,
    domain_type: str,
) -> dict[str, Any]:
    libvirt_facts = facts.get("libvirt", {})
    return {
        "run_id": run_id,
        "spec_name": spec.name,
        "spec_path": str(spec_path),
        "spec": raw,
        "spec_sha256": spec_sha,
        "densitylab_version": __version__,
        "git_commit": store.git_commit(REPO),
        "host": facts,
        "kernel_release": os.uname().release,
        "qemu_version": libvirt_facts.get("qemu"),
        "libvirt_version": libvirt_facts.get("libvirt"),
        "accel": "kvm" if domain_type == "kvm" else "tcg",
        "accel_how": facts["accel"]["how"],
        "images": {"tiny": describe_image(image), **lab_image_record(spec)},
        **dict(zip(("kernels", "warnings"), kernel_records(spec), strict=True)),
        "seed": spec.seed,
        "workload_seed": spec.workload_seed,
        "host_workload_seed": spec.host_workload_seed,
        "started_at": store.utc_now(),
        "ended_at": None,
        "trials": [],
        "files": {},
    }


def kernel_records(spec: Spec) -> tuple[list[dict[str, Any]], list[str]]:
    """The kernels under test (release, origin, config hash) and A/B hygiene warnings:
    two kernels that differ by more than the change under study."""
    if spec.host.kind != "labvm":
        return [
            {"name": k, "release": os.uname().release, "origin": "running", "config_sha256": None}
            for k in labels(spec.kernels)
        ], []
    import json

    from orchestrator import kbuild, labimage

    built = {
        k["label"]: k for k in json.loads(labimage.find_lab_image().manifest.read_text())["kernels"]
    }
    recs = []
    for entry in spec.kernels:
        local = kbuild.bootable(entry)
        if local is not None:  # origin, tree hash, patch sha256s, config sha256
            recs.append(dict(local.record))
        elif (k := built.get(label_of(entry))) is not None:
            recs.append(
                {
                    "name": k["label"],
                    "release": k["release"],
                    "origin": k["origin"],
                    "config_sha256": k.get("config_sha256"),
                }
            )
    warnings = []
    for a, b in itertools.pairwise(recs):
        diffs = []
        if a["release"].split("+")[0] != b["release"].split("+")[0]:
            diffs.append(f"versions {a['release']} vs {b['release']}")
        if a["config_sha256"] != b["config_sha256"]:
            diffs.append("configs differ")
        if a.get("tree_sha256") and b.get("tree_sha256"):
            b["differs_from"] = abdiff.source_pair_diff(a, b)
            if a["tree_sha256"] != b["tree_sha256"]:
                diffs.append("source trees differ")
        if diffs:
            warnings.append(
                f"kernels {a['name']} and {b['name']} differ by more than the "
                f"change under study ({'; '.join(diffs)}): other changes between "
                "them can move these numbers too"
            )
    return recs, warnings


def lab_image_record(spec: Spec) -> dict[str, Any]:
    """The lab image's manifest (kernels with release, origin and config hash)."""
    if spec.host.kind != "labvm":
        return {}
    import json

    from orchestrator import labimage

    lab = labimage.find_lab_image()
    return {
        "labhost": {
            "key": lab.key,
            "rootfs": str(lab.rootfs),
            "build_manifest": json.loads(lab.manifest.read_text()),
        }
    }


def describe_image(image: images.TinyImage) -> dict[str, Any]:
    """The image's build manifest plus the checksums of what the guests boot."""
    import json

    return {
        "key": image.key,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "kernel_sha256": store.sha256_file(image.kernel),
        "initrd_sha256": store.sha256_file(image.initrd),
        "build_manifest": json.loads(image.manifest.read_text()),
    }


def record_trial(manifest: dict[str, Any], res: TrialResult) -> None:
    manifest["trials"] = [t for t in manifest["trials"] if t["trial_id"] != res.trial_id]
    manifest["trials"].append(
        {
            "trial_id": res.trial_id,
            "kernel": res.kernel,
            "fleet_size": res.fleet_size,
            "repeat": res.repeat,
            "status": res.status,
            "reason": res.reason,
        }
    )


@dataclass
class RunOutcome:
    store: store.RunStore
    results: list[TrialResult]
    skipped: list[str]

    @property
    def ok(self) -> bool:
        return all(r.status == "successful" for r in self.results)


Prepared = tuple[images.TinyImage, dict[str, Any], str]


def prepare(spec: Spec, spec_path: Path) -> Prepared:
    """Validate everything that can be checked before the host is touched (the run lock
    is held already, so another run's guests cannot make this host look full)."""
    from orchestrator import doctor  # imports libvirt; kept out of `plan`'s path

    check_fits_host(spec, host_available_mib(), str(spec_path))
    image = images.find_tiny_image()
    if spec.host.kind == "labvm":
        from orchestrator import labimage

        lab = labimage.find_lab_image()
        for k in spec.kernels:
            # UsageError naming the kernel the image lacks; HostError for one not built
            labimage.resolve_kernel(lab, k)
    report = doctor.run_doctor(check_bpf=False)
    if not report.ok:
        raise HostError("host not ready: " + "; ".join(report.problems))
    return image, report.facts, pick_domain_type(spec.fleet.accel, report.facts)


def open_resumed(resume: Path, spec_path: Path, sha: str) -> store.RunStore:
    """The run directory to resume; reads only. UsageError when it is none, or when its
    spec differs."""
    # The resumed run is input too: its manifest is validated (one line on a broken one)
    # before the lock, the sweep or the doctor touch the host.
    if load_manifest(resume).get("spec_sha256") != sha:
        raise UsageError(
            f"{spec_path}: differs from the spec of run {resume} "
            "(a resumed run must use the same spec)"
        )
    return store.RunStore.open(resume)


def sweep_killed_run(st: store.RunStore, done: set[str]) -> None:
    """Before a resume reruns anything: remove what the killed process left on the host
    (its domains, samplers, probes, swap, cgroups, overlays: `clean` for this run id),
    and set aside the folders of trials it did not finish, so their console logs,
    samples and artifacts do not mix with the rerun's. Raises HostError when something
    could not be removed (a rerun would trip over it)."""
    from orchestrator import cleanup

    report = cleanup.sweep_owned(st.run_id)
    for r in report.removed:
        log.warning("resume %s: removed %s", st.run_id, r)
    if report.errors:
        raise HostError(
            f"resume {st.run_id}: cannot remove what the killed run left: "
            + "; ".join(report.errors)
        )
    # A kill in the middle of an atomic write leaves its temp file (.<name>.<random>);
    # the file it was to replace is intact.
    for tmp in [*st.root.glob(".*.json.*"), *st.root.glob(".*.parquet.*")]:
        tmp.unlink(missing_ok=True)
    trials = st.root / "trials"
    for d in sorted(trials.iterdir()) if trials.is_dir() else []:
        if d.is_dir() and d.name not in done:
            n = 1
            while (st.root / "unfinished" / f"{d.name}.{n}").exists():
                n += 1
            (st.root / "unfinished").mkdir(exist_ok=True)
            d.rename(st.root / "unfinished" / f"{d.name}.{n}")
            log.warning("resume %s: set aside unfinished trial folder %s", st.run_id, d.name)


def run_experiment(
    spec_path: Path,
    results_dir: Path = Path("results"),
    resume: Path | None = None,
    progress: Progress | None = None,
) -> RunOutcome:
    """Run every trial of a spec (skipping finished ones when resuming).

    The run's lock is taken before the host is touched: HostBusy (exit 2) when another
    run is live here, or the resumed run is."""
    spec, raw, sha = load_spec(spec_path)
    resumed = open_resumed(resume, spec_path, sha) if resume is not None else None
    run_id = resumed.run_id if resumed is not None else store.new_run_id(spec.name)
    with runlock.acquire_run(run_id, spec.name):
        adopt_saved_ksm(run_id)
        if resumed is not None:
            sweep_killed_run(resumed, resumed.finished_trials())
        image, facts, domain_type = prepare(spec, spec_path)
        st = resumed or store.RunStore.create(results_dir, spec.name, run_id)
        manifest = (
            st.read_manifest()
            if resumed is not None
            else new_manifest(spec_path, raw, sha, spec, facts, image, st.run_id, domain_type)
        )
        return run_trials(spec, spec_path, st, manifest, image, facts, domain_type, progress)


def run_trials(
    spec: Spec,
    spec_path: Path,
    st: store.RunStore,
    manifest: dict[str, Any],
    image: images.TinyImage,
    facts: dict[str, Any],
    domain_type: str,
    progress: Progress | None,
) -> RunOutcome:
    manifest["ended_at"] = None
    st.write_manifest(manifest)
    done = st.finished_trials()
    guard = InterruptGuard()
    conn = fleet.connect()
    ctx = RunContext(
        spec, spec_path, st, image, conn, domain_type, facts, guard, progress or QuietProgress()
    )
    outcome = RunOutcome(st, [], [])
    try:
        with guard.installed():
            for trial in plan.expand(spec):
                if trial.trial_id in done:
                    outcome.skipped.append(trial.trial_id)
                    continue

                def on_result(res: TrialResult) -> None:
                    outcome.results.append(res)
                    record_trial(manifest, res)
                    finish_run(st, manifest)

                run_trial(ctx, trial, on_result)
            checks.run_within(spec, st, manifest, guard)  # the spec's checks:, per kernel
    finally:
        finish_run(st, manifest)
        conn.close()
    return outcome


def finish_run(st: store.RunStore, manifest: dict[str, Any]) -> None:
    """Fold trial parts into run tables and write the manifest with checksums."""
    manifest["files"] = st.rebuild_run_tables()
    manifest["ended_at"] = store.utc_now()
    st.write_manifest(manifest)
