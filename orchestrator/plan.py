"""Spec -> trials: the expanded matrix of (kernel, fleet size, VMA count, KSM setting,
repeat) and a time estimate."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.errors import UsageError
from orchestrator.kernelspec import labels
from orchestrator.results.history import History
from orchestrator.spec import MAX_TRIALS, KnobValue, Spec

# Rough costs measured on a 2-core TCG host (LAB-NOTES: ~5 s boot, fills of 160 MiB in
# 14-34 s for 4 guests); used only for the estimate `plan` prints.
BOOT_S = 8.0
BOOT_S_PER_GUEST = 1.5
FILL_MIB_PER_S = 25.0
ANSIBLE_PLAY_S = 4.0
TEARDOWN_S = 3.0
PAGES_PER_MIB = 256
# A lab-host VM to its shell under TCG, agent shipped (LAB-NOTES: ~15 s + the probe);
# a kexec between kernels on a lab machine (measured 8.5-31 s on lab VMs).
LAB_BOOT_S = 40.0
SWITCH_S = 30.0
# A trigger step (one migrate repeat, the reclaim pass) and the restore after reclaim,
# as measured in make ab-demo here (lab host, 1,000 pages moved, 8 MiB reclaimed per
# workload: ~10 s each on either kernel at 2,000 VMAs; more for the old walk at 10,000).
TRIGGER_S = 10.0
RESTORE_S = 10.0


@dataclass(frozen=True)
class Trial:
    trial_id: str
    kernel: str
    fleet_size: int
    repeat: int
    vmas: int = 0  # fragmentation of the host workload (0: none or no host workload)
    # Every KSM knob the trial applies, as (name, value) in the spec's order, and the
    # names of those the spec sweeps.
    ksm: tuple[tuple[str, KnobValue], ...] = ()
    ksm_swept: tuple[str, ...] = ()

    @property
    def knobs(self) -> dict[str, KnobValue]:
        return dict(self.ksm)

    @property
    def ksm_setting(self) -> str | None:
        """The swept knobs' values, `pages_to_scan=100` (several: comma-separated); None
        when the spec sweeps none."""
        k = self.knobs
        return ",".join(f"{n}={k[n]}" for n in self.ksm_swept) or None


def setting_id(setting: dict[str, KnobValue]) -> str:
    """A swept setting in a trial id: `-pages_to_scan100` (values are integers or words
    of [a-z-]; both keep the id a valid name)."""
    return "".join(f"-{name}{value}" for name, value in setting.items())


def trial_knobs(spec: Spec, setting: dict[str, KnobValue]) -> tuple[tuple[str, KnobValue], ...]:
    fixed = spec.ksm_fixed
    return tuple((k, setting[k] if k in setting else fixed[k]) for k in spec.ksm)


def expand(spec: Spec) -> list[Trial]:
    """fleet sizes x host-workload VMA counts x KSM settings x repeats x kernels,
    kernels innermost.

    The VMA count appears in the trial id only when it is swept or the host workload is
    the point of the run (a lab host); a KSM setting only when a knob is swept.

    Raises UsageError when the matrix would exceed MAX_TRIALS (counted before it is
    built) or two trials would share an id (their tables would overwrite each other);
    the spec refuses both already, this keeps a hand-built Spec honest too."""
    if spec.trial_count > MAX_TRIALS:
        raise UsageError(f"spec {spec.name}: {spec.matrix_too_large()}")
    vmas = spec.vma_sweep
    show_vmas = len(vmas) > 1 or spec.host.kind != "local"
    swept = tuple(k for k, v in spec.ksm.items() if isinstance(v, list))
    trials = [
        Trial(
            f"{k}-n{n}" + (f"-v{v}" if show_vmas else "") + setting_id(s) + f"-r{r}",
            k,
            n,
            r,
            v,
            trial_knobs(spec, s),
            swept,
        )
        for n in spec.fleet.counts
        for v in vmas
        for s in spec.ksm_sweep
        for r in range(spec.repeats)
        for k in labels(spec.kernels)  # innermost: kernels interleave, so host drift hits both
    ]
    ids = [t.trial_id for t in trials]
    if len(set(ids)) < len(ids):
        twice = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise UsageError(f"spec {spec.name}: trial id {twice} would repeat")
    return trials


def full_scan_s(spec: Spec, fleet_size: int, knobs: dict[str, KnobValue] | None = None) -> float:
    """Seconds for one KSM full scan over every guest's RAM at the scan rate of `knobs`
    (default: the spec's first setting)."""
    if knobs is None:
        knobs = dict(trial_knobs(spec, spec.ksm_sweep[0]))
    pages = fleet_size * spec.fleet.memory_mib * PAGES_PER_MIB
    # The spec holds both knobs to integers with pages_to_scan >= 1; a zero sleep still
    # takes about a millisecond per batch.
    per_batch = max(1, int(knobs.get("pages_to_scan", 100)))
    per_s = per_batch * 1000 / max(1, int(knobs.get("sleep_millisecs", 20)))
    return pages / per_s


def estimate_s(spec: Spec, trial: Trial) -> float:
    scans = spec.phases.merge.settle_scans + 2
    boot = BOOT_S + BOOT_S_PER_GUEST * trial.fleet_size
    scan_s = full_scan_s(spec, trial.fleet_size, trial.knobs or None)
    baseline = scans * scan_s if spec.phases.baseline.enabled else 0
    fill = 3 * ANSIBLE_PLAY_S + spec.workload.mib * trial.fleet_size / FILL_MIB_PER_S
    merge = min(spec.phases.merge.timeout_s, scans * scan_s)
    ph = spec.phases
    triggers = TRIGGER_S * ((ph.migrate.repeats if ph.migrate.enabled else 0) + ph.reclaim.enabled)
    restore = RESTORE_S if ph.reclaim.enabled else 0.0
    return boot + baseline + fill + merge + ph.hold.duration_s + triggers + restore + TEARDOWN_S


def overhead_s(spec: Spec, trials: list[Trial]) -> float:
    """What a run spends outside its trials: lab-host boots (one per kernel, or per
    trial), kernel switches on lab machines."""
    kernels = len({t.kernel for t in trials})
    if spec.host.kind == "labvm":
        return LAB_BOOT_S * (len(trials) if spec.host.boot == "per-trial" else kernels)
    if spec.host.kind == "inventory":
        return SWITCH_S * kernels
    return 0.0


@dataclass(frozen=True)
class Estimate:
    """Seconds per trial and for the rest of the run, each with where it came from."""

    trial_s: list[tuple[float, str]]
    overhead_s: float
    overhead_from: str
    machines: int = 1  # trials run side by side on this many (an inventory's)

    @property
    def total_s(self) -> float:
        return makespan_s([s for s, _ in self.trial_s], self.machines) + self.overhead_s


def makespan_s(trial_s: list[float], machines: int) -> float:
    """How long trials take on `machines` working side by side, each taking the next
    trial when it is free: longest first onto the least busy machine (the pool hands
    trials out as machines free up; its order differs, so this is an estimate)."""
    busy = [0.0] * max(1, machines)
    for s in sorted(trial_s, reverse=True):
        busy[busy.index(min(busy))] += s
    return max(busy)


def estimate(
    spec: Spec, trials: list[Trial], history: History | None = None, machines: int = 1
) -> Estimate:
    """Each trial from earlier runs of the spec here (median of its successful
    attempts) where there are any, else from the model above, which leaves out what
    only a run can tell (trigger and walk costs: they depend on the kernel). An
    inventory's `machines` run trials side by side."""
    h = history or History()
    runs = f"{h.runs} earlier run{'s' if h.runs != 1 else ''}" + (
        "" if h.same_spec else " of an earlier version of the spec"
    )
    per_trial = []
    for t in trials:
        past = h.trial(t.trial_id)
        per_trial.append((past, runs) if past is not None else (estimate_s(spec, t), "model"))
    past_overhead = h.overhead()
    if past_overhead is not None:
        return Estimate(per_trial, past_overhead, runs, machines)
    return Estimate(per_trial, overhead_s(spec, trials), "model", machines)
