"""The experiment spec: a validated model of one YAML file.

Unknown keys are rejected; every error names the file and the key path, in one line:
`experiments/x.yaml: fleet.memory_mib: Input should be greater than 0, got -1`.

A spec is untrusted input, so every number has a range, the trial matrix a size limit,
and the file itself is read as a small regular file by a YAML loader that refuses
aliases, duplicate keys and deep nesting (see read_regular_file, SpecLoader).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from orchestrator.errors import UsageError, printable, shorten, shown
from orchestrator.hosts.methods import HostKind, refusal
from orchestrator.kernelspec import KernelEntry, label_of

# fullmatch, not match with `$`: `$` also matches before a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
SHARE_TOLERANCE = 1e-6
# A spec is a page of YAML (the shipped ones: 1-2 KiB, ~100 nodes). The loader is
# pure Python (its hooks below need that) at ~50 us a node on a busy 2-core host, so
# both the bytes and the nodes are bounded to keep a refusal well under a second.
MAX_SPEC_BYTES = 256 << 10
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32  # the model nests 4 deep; Python recursion ends near 1000
# Bounds, so that a typo cannot ask for a year, a petabyte or a billion trials.
MAX_MIB = 1 << 20  # 1 TiB, dlfill's own limit on --mib
MAX_TIMEOUT_S = 86_400.0
MAX_GUESTS = 1024
MAX_VCPUS = 64
MAX_SWEEP = 64  # entries in one swept list
MAX_REPEATS = 100
MAX_TRIALS = 1000  # checked before the matrix is expanded
MAX_KERNELS = 16
# dlfill parses --seed as an unsigned 64-bit integer; host copies use seed + 1.
MAX_SEED = 2**64 - 2
# vm.max_map_count defaults to 65530; a process needs a few dozen VMAs of its own.
MAX_FRAGMENT_VMAS = 65_000
PAGES_PER_MIB = 256
# KSM knobs across the kernels densitylab supports (6.1 .. 7.x), with the values each
# accepts here; the host agent checks at run time that the running kernel really has
# the ones a spec names. Ranges follow mm/ksm.c where it has one (max_page_sharing >= 2,
# advisor_target_scan_time >= 1, booleans 0/1) and are sane bounds where it has none.
KSM_KNOB_RANGES: dict[str, tuple[int, int]] = {
    "pages_to_scan": (1, 1_000_000),  # 0 would never merge (and never settle)
    "sleep_millisecs": (0, 60_000),
    "max_page_sharing": (2, 1 << 20),
    "merge_across_nodes": (0, 1),
    "use_zero_pages": (0, 1),
    "smart_scan": (0, 1),
    "stable_node_chains_prune_millisecs": (0, 3_600_000),
    "advisor_max_cpu": (1, 100),
    "advisor_min_pages_to_scan": (1, 1_000_000),
    "advisor_max_pages_to_scan": (1, 1_000_000),
    "advisor_target_scan_time": (1, 3_600),
}
KSM_KNOB_WORDS: dict[str, tuple[str, ...]] = {"advisor_mode": ("none", "scan-time")}
KSM_KNOBS = frozenset({"run", *KSM_KNOB_RANGES, *KSM_KNOB_WORDS})
# KSM correctness checks (images/checks/dlcheck subcommands) a spec can ask for.
CheckName = Literal["mremap-swap", "smart-scan-remerge", "unmerge-intact", "zero-pages", "ksm-stat"]
# Per-guest memory QEMU (TCG) takes beyond guest RAM, for the fits-on-host check (MiB).
QEMU_OVERHEAD_MIB = 96

PositiveInt = Annotated[int, Field(gt=0)]
Mib = Annotated[int, Field(gt=0, le=MAX_MIB)]
# >= 1 s: plays take whole seconds, and int(0.5) was 0, which ansible-runner reads as none
TimeoutS = Annotated[float, Field(ge=1, le=MAX_TIMEOUT_S)]
DelayS = Annotated[float, Field(ge=0, le=MAX_TIMEOUT_S)]
Repeats = Annotated[int, Field(ge=1, le=MAX_REPEATS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Vmas = Annotated[int, Field(ge=0, le=MAX_FRAGMENT_VMAS)]
FIELD_ERROR = "densitylab_field"


class Strict(BaseModel):
    # strict: no bool where a number is expected (`count: true` is not 1), no "5" for 5;
    # no inf or nan in any float.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def field_error(path: str, message: str, value: Any = ...) -> PydanticCustomError:
    """An error a model check raises for a field below it (`kernels.1`, `ksm.smart_scan`);
    format_validation_error appends `path` to the error's location."""
    ctx = {"field": path, "message": message, "shown": "" if value is ... else shown(value)}
    return PydanticCustomError(FIELD_ERROR, "{message}", ctx)


def check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            "use letters, digits, '_', '.', '-' (at most 48, no quotes, slashes "
            "or XML metacharacters)"
        )
    return value


class Host(Strict):
    """Where the experiment runs: this machine, one lab-host VM per kernel under test
    (booted from the lab image; TCG here, KVM on real hardware), or the machines of an
    Ansible inventory (each switched into the trial's kernel)."""

    kind: HostKind = "local"
    # kind inventory: the user's own inventory file (INI or YAML) and the group to use
    inventory: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    pattern: Annotated[str, Field(min_length=1, max_length=200)] = "all"
    switch: Literal["kexec", "reboot"] = "kexec"
    switch_timeout_s: TimeoutS = 300
    memory_mib: Annotated[int, Field(ge=512, le=MAX_MIB)] = 4096
    vcpus: Annotated[int, Field(gt=0, le=MAX_VCPUS)] = 2
    numa_cells: Annotated[int, Field(ge=1, le=8)] = 2
    boot_timeout_s: TimeoutS = 240
    # kind labvm: one VM per kernel kept for all its trials (a boot costs ~40 s under
    # TCG), or a fresh VM for every trial
    boot: Literal["per-kernel", "per-trial"] = "per-kernel"


def check_sweep(values: Sequence[object], what: str) -> None:
    """A swept list: 1..MAX_SWEEP entries, none twice (a repeated entry would make two
    trials with one id, whose tables overwrite each other)."""
    if not values:
        raise ValueError(f"a sweep needs at least one {what}")
    if len(values) > MAX_SWEEP:
        raise ValueError(f"a sweep of at most {MAX_SWEEP} {what}s, got {len(values)}")
    for i, v in enumerate(values):
        if v in values[:i]:
            raise field_error(str(i), f"{what} {v} is listed twice (trial ids would repeat)")


PathText = Annotated[str, Field(min_length=1, max_length=4096)]


class ImagePath(Strict):
    """The user's own image: a qcow2 (or raw) disk that runs qemu-guest-agent. Every
    guest boots a qcow2 overlay on it. Without `kernel` it boots through its own
    bootloader; with one, that kernel (and initrd, cmdline) boots the disk directly."""

    path: PathText
    kernel: PathText | None = None
    initrd: PathText | None = None
    cmdline: Annotated[str, Field(max_length=4096)] = "root=/dev/vda rw console=ttyS0 quiet"

    @model_validator(mode="after")
    def _initrd_needs_kernel(self) -> ImagePath:
        if self.initrd is not None and self.kernel is None:
            raise field_error("initrd", "an initrd boots only with a kernel (add kernel:)")
        return self


def shown_image(image: str | ImagePath) -> str:
    return image if isinstance(image, str) else image.path


class Fleet(Strict):
    count: (
        Annotated[int, Field(gt=0, le=MAX_GUESTS)]
        | Annotated[list[Annotated[int, Field(gt=0, le=MAX_GUESTS)]], Field(max_length=MAX_SWEEP)]
    ) = 1
    vcpus: Annotated[int, Field(gt=0, le=MAX_VCPUS)] = 1
    memory_mib: Annotated[int, Field(ge=64, le=MAX_MIB)] = 256
    # tiny: busybox initramfs (fill workloads only); debian: Debian 12 (make
    # debian-image); {path: ...}: the user's own image
    image: Literal["tiny", "debian"] | ImagePath = "tiny"
    accel: Literal["auto", "kvm", "tcg"] = "auto"

    @field_validator("count")
    @classmethod
    def _sweep(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list):
            check_sweep(v, "fleet size")
        return v

    @property
    def counts(self) -> list[int]:
        return self.count if isinstance(self.count, list) else [self.count]


def region_pages(mib: int) -> int:
    return mib * PAGES_PER_MIB


def check_fragment(vmas: int, mib: int, path: str) -> None:
    """dlfill splits its region into `vmas` VMAs by protecting every other page: it needs
    at least one page per VMA (it refuses --fragment above the region's pages)."""
    if vmas > region_pages(mib):
        raise field_error(
            path, f"{vmas} VMAs need {vmas} pages; the {mib} MiB region has {region_pages(mib)}"
        )


def volatile_start(w: Workload) -> tuple[int, int]:
    """(first volatile page, volatile pages) as dlfill's make_layout computes them."""
    pages = region_pages(w.mib)

    def rnd(x: float) -> int:  # llround: halves away from zero
        return math.floor(x * pages + 0.5)

    zero, unique, vol = rnd(w.zero), rnd(w.unique), rnd(w.volatile)
    while zero + unique + vol > pages:
        if vol:
            vol -= 1
        elif unique:
            unique -= 1
        else:
            zero -= 1
    return pages - vol, vol


class Workload(Strict):
    """kind fill: dlfill's pattern in every guest (mib, dup, ...). kind playbook: an
    Ansible playbook run in every guest after boot (vars as extra vars), and an
    optional `load` playbook run during the hold."""

    kind: Literal["fill", "playbook"] = "fill"
    playbook: PathText | None = None
    vars: Annotated[dict[str, int | float | str | bool], Field(max_length=64)] = {}
    load: PathText | None = None
    mib: Mib = 64
    dup: Annotated[float, Field(ge=0, le=1)] = 1.0
    zero: Annotated[float, Field(ge=0, le=1)] = 0.0
    unique: Annotated[float, Field(ge=0, le=1)] = 0.0
    volatile: Annotated[float, Field(ge=0, le=1)] = 0.0
    volatile_rate_pps: Annotated[int, Field(ge=0, le=10_000_000)] = 0
    fragment_vmas: Vmas = 0
    # distinct: duplicate page i differs from page j (each KSM page has one mapping per
    # copy); one-content: every duplicate page holds one content, so KSM pages carry up
    # to max_page_sharing mappings (the published rmap_walk_ksm benchmark's shape).
    pattern: Literal["distinct", "one-content"] = "distinct"
    seed: Seed | None = None

    @model_validator(mode="after")
    def _playbook_fields(self) -> Workload:
        if self.kind == "playbook" and self.playbook is None:
            raise field_error("playbook", "kind playbook needs a playbook file")
        if self.kind == "fill":
            for name in ("playbook", "load"):
                if getattr(self, name) is not None:
                    raise field_error(name, "only for kind playbook")
            if self.vars:
                raise field_error("vars", "only for kind playbook")
        return self

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> Workload:
        total = self.dup + self.zero + self.unique + self.volatile
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"dup + zero + unique + volatile must sum to 1, got {total:g}")
        check_fragment(self.fragment_vmas, self.mib, "fragment_vmas")
        start, vol = volatile_start(self)
        # dlfill refuses this too: rewriting a page fragmentation made read-only faults.
        if self.volatile_rate_pps and vol and self.fragment_vmas > start + 1:
            raise field_error(
                "fragment_vmas",
                f"{self.fragment_vmas} VMAs reach the volatile pages (from page {start}); "
                "lower it or set volatile_rate_pps: 0",
            )
        return self


KnobValue = int | str
# A knob in `ksm:` is one value, or a list of values swept as a trial dimension.
KnobSetting = KnobValue | Annotated[list[KnobValue], Field(max_length=MAX_SWEEP)]


class Capacity(Strict):
    """What a capacity planner allows: RAM kept free on the host, the ksmd CPU a KSM
    setting may cost (percent of one core, over the merge and hold), and how long the
    fleet may take to settle. A setting over either limit is marked as breaking the
    budget; the best one within it is named. None: no limit."""

    reserve_mib: Annotated[int, Field(ge=0, le=MAX_MIB)] | None = None
    ksmd_cpu_max_pct: Annotated[float, Field(gt=0, le=100 * MAX_VCPUS)] | None = None
    settle_max_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S)] | None = None


class Boot(Strict):
    timeout_s: TimeoutS = 120


class Baseline(Strict):
    enabled: bool = True
    timeout_s: TimeoutS = 90


class Fill(Strict):
    timeout_s: TimeoutS = 300


class Merge(Strict):
    timeout_s: TimeoutS = 300
    settle_pct: Annotated[float, Field(gt=0, le=100)] = 1.0
    # Ten, not two: with smart_scan, a page KSM has seen unmergeable for a while (boot
    # content the fill then overwrote) is skipped for up to 8 scans before its new
    # content is even looked at. Over two scans sharing looked settled 7% short of the
    # prediction on the smoke spec; over five it was within 0.1%.
    settle_scans: Annotated[int, Field(ge=1, le=1000)] = 10


class Hold(Strict):
    duration_s: DelayS = 5


class Attribute(Strict):
    """Scramble the workload's pages after the hold and let KSM settle again: the
    saving that disappears is the workload's own, measured apart from boot leftovers."""

    enabled: bool = True
    timeout_s: TimeoutS = 120


class Migrate(Strict):
    """Force page migration while KSM pages exist: moving the processes between NUMA
    nodes (needs two nodes), offlining and onlining the memory blocks that hold their
    mergeable pages (targeted, needs memory hotplug), or host-wide compaction (moves
    only what lies below its scanners' meeting point). auto: numa, else compaction."""

    enabled: bool = False
    method: Literal["auto", "compaction", "numa", "offline"] = "auto"
    repeats: Repeats = 3
    settle_s: DelayS = 2
    # numa only: move this many of each process's mergeable pages (evenly spread) with
    # move_pages(2) instead of every page with migratepages: as many walks as the
    # statistics need, in a fraction of the time.
    pages: Annotated[int, Field(gt=0, le=MAX_MIB * 256)] | None = None


class Reclaim(Strict):
    """Force reclaim of the cgroup that owns the KSM pages, with swap the tool provides.

    `memory.reclaim` (cgroup v2) asks the kernel for `reclaim_mib`; on cgroup v1 the
    owner's limit is stepped down through `v1_limit_steps_mib` (one big step fails
    with EBUSY), then restored."""

    enabled: bool = False
    method: Literal["auto", "memory.reclaim", "v1-limit-steps"] = "auto"
    swap: Literal["zram", "swapfile"] = "zram"
    swap_mib: Mib = 2048
    reclaim_mib: Mib = 128
    v1_limit_steps_mib: list[Mib] = [150, 60]
    repeats: Repeats = 1
    settle_s: DelayS = 2

    @field_validator("v1_limit_steps_mib")
    @classmethod
    def _descending(cls, v: list[int]) -> list[int]:
        if not v or len(v) > MAX_SWEEP or v != sorted(set(v), reverse=True):
            raise ValueError(f"give 1 to {MAX_SWEEP} steps, in strictly descending order")
        return v


class Phases(Strict):
    boot: Boot = Boot()
    baseline: Baseline = Baseline()
    fill: Fill = Fill()
    merge: Merge = Merge()
    hold: Hold = Hold()
    migrate: Migrate = Migrate()
    reclaim: Reclaim = Reclaim()
    attribute: Attribute = Attribute()


class Sampling(Strict):
    interval_s: Annotated[float, Field(ge=0.1, le=60)] = 1.0


class Latency(Strict):
    """How rmap_walk_ksm is timed during migrate/reclaim; auto takes the cheapest exact
    method the host allows (the kernel's rmap walk tracepoint, bpf-fentry, kprobe),
    else the tracepoint proxy (a lower bound, migration only)."""

    method: Literal["auto", "tracepoint", "bpf-fentry", "kprobe", "tracepoint-proxy", "none"] = (
        "auto"
    )
    stop_when_tight: StopWhenTight | None = None


class StopWhenTight(Strict):
    """End each migrate or reclaim window early once every walk function's median walk
    is known to within +-ci_pct (95%, distribution-free) from at least min_walks walks;
    `pages` and `reclaim_mib` stay the most a window does. Needs the bpf-fentry
    collector, which can be read while it collects; with another method every page is
    walked and the trial's events say so."""

    ci_pct: Annotated[float, Field(gt=0, le=50)] = 5.0
    min_walks: Annotated[int, Field(ge=50, le=100_000)] = 400


class HostWorkload(Strict):
    """dlfill processes on the host itself: the fragmented mergeable memory whose KSM
    pages make the old rmap_walk_ksm walk every VMA of one anon_vma."""

    copies: Annotated[int, Field(ge=0, le=64)] = 0
    mib: Mib = 64
    fragment_vmas: Vmas | Annotated[list[Vmas], Field(max_length=MAX_SWEEP)] = 2000
    pattern: Literal["distinct", "one-content"] = "distinct"  # see Workload.pattern

    @field_validator("fragment_vmas")
    @classmethod
    def _sweep(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list):
            check_sweep(v, "VMA count")
        return v

    @model_validator(mode="after")
    def _fits_region(self) -> HostWorkload:
        swept = isinstance(self.fragment_vmas, list)
        for i, n in enumerate(self.vma_counts):
            check_fragment(n, self.mib, f"fragment_vmas.{i}" if swept else "fragment_vmas")
        return self

    @property
    def vma_counts(self) -> list[int]:
        v = self.fragment_vmas
        return v if isinstance(v, list) else [v]


def check_kernel_labels(labels: Sequence[str], kind: str, path: str = "kernels") -> None:
    """The kernel labels of a spec: names (they reach run ids, folders and domain names),
    none twice (trial ids would repeat), and what the host kind can boot. Raises a
    field error naming the entry, e.g. `kernels.1`."""
    if not labels:
        raise field_error(path, "name at least one kernel")
    if len(labels) > MAX_KERNELS:
        raise field_error(path, f"at most {MAX_KERNELS} kernels, got {len(labels)}")
    for i, label in enumerate(labels):
        where = f"{path}.{i}"
        try:
            check_name(label)
        except ValueError as e:
            raise field_error(where, str(e), label) from None
        if label in labels[:i]:
            raise field_error(where, f"kernel {label} is listed twice (trial ids would repeat)")
        if kind == "local" and label != "running":
            raise field_error(
                where,
                "a local host runs only its running kernel: use [running], or "
                "host.kind: labvm to boot other kernels",
                label,
            )
        if kind == "labvm" and label == "running":
            raise field_error(
                where, "a lab host boots kernels of the lab image, by label (e.g. ['6.12', '7.3'])"
            )
        if kind == "inventory" and label == "running":
            raise field_error(
                where,
                "a lab machine is switched into each kernel by label, the release it "
                "starts with (e.g. ['6.12', '7.3'])",
            )


def check_ksm_knob(name: str, value: int | str, path: str | None = None) -> None:
    """One KSM knob against the values it accepts (KSM_KNOB_RANGES, KSM_KNOB_WORDS);
    path: where the error points (a swept entry: `pages_to_scan.1`)."""
    where = path or name
    if name == "run":
        raise field_error(name, "run is set by densitylab itself per phase; leave it out")
    if name in KSM_KNOB_WORDS:
        words = KSM_KNOB_WORDS[name]
        if value not in words:
            raise field_error(where, f"expected one of {', '.join(words)}", value)
        return
    if name not in KSM_KNOB_RANGES:
        known = ", ".join(sorted(KSM_KNOBS - {"run"}))
        raise field_error(printable(shorten(name)), f"unknown KSM knob (known: {known})")
    lo, hi = KSM_KNOB_RANGES[name]
    if not isinstance(value, int) or not lo <= value <= hi:
        raise field_error(where, f"expected an integer in [{lo}, {hi}]", value)


class Spec(Strict):
    name: str
    description: Annotated[str, Field(max_length=2000)] = ""
    host: Host = Host()
    kernels: Annotated[list[KernelEntry], Field(max_length=MAX_KERNELS)] = ["running"]
    fleet: Fleet = Fleet()
    workload: Workload = Workload()
    ksm: dict[str, KnobSetting] = {"pages_to_scan": 2000, "sleep_millisecs": 20}
    phases: Phases = Phases()
    sampling: Sampling = Sampling()
    latency: Latency = Latency()
    host_workload: HostWorkload = HostWorkload()
    repeats: Repeats = 1
    seed: Seed = 1
    host_reserve_mib: Annotated[int, Field(ge=0, le=MAX_MIB)] = 2048
    # Run by `densitylab check` on every kernel; empty there means all of them.
    checks: Annotated[list[CheckName], Field(max_length=16)] = []
    capacity: Capacity = Capacity()

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @model_validator(mode="after")
    def _kernels_fit_host(self) -> Spec:
        check_kernel_labels([label_of(k) for k in self.kernels], self.host.kind)
        h = self.host
        if h.kind == "inventory" and self.checks:
            raise field_error(
                "checks",
                "not yet on host.kind inventory (they run here or in lab VMs: "
                "`densitylab check` with host.kind labvm)",
            )
        if h.kind == "inventory" and h.inventory is None:
            raise field_error("host.inventory", "host.kind inventory needs an inventory file")
        if h.kind != "inventory" and h.inventory is not None:
            raise field_error("host.inventory", "only for host.kind inventory", h.inventory)
        if h.kind == "labvm":
            for what, n in (("vcpus", h.vcpus), ("memory_mib", h.memory_mib)):
                if n % h.numa_cells:
                    raise field_error(
                        f"host.{what}",
                        f"{n} does not split into {h.numa_cells} equal NUMA cells "
                        "(host.numa_cells)",
                    )
        if self.trial_count > MAX_TRIALS:
            raise field_error("repeats", self.matrix_too_large())
        return self

    @model_validator(mode="after")
    def _workload_fits_image(self) -> Spec:
        """A playbook needs a guest with python3; the fill's scramble and the tiny
        image's dlfill belong together; only this machine runs guests of a disk image."""
        image, w = self.fleet.image, self.workload
        if w.kind == "playbook" and image == "tiny":
            raise field_error(
                "fleet.image", "workload kind playbook needs debian or {path: ...}", image
            )
        if w.kind == "fill" and image != "tiny":
            raise field_error("workload.kind", "fill runs dlfill in the tiny image only", "fill")
        if w.kind == "playbook" and self.phases.attribute.enabled:
            raise field_error(
                "phases.attribute.enabled",
                "the scramble is the fill's; a playbook's saving is the fleet's with its "
                "workload less the idle fleet's (phases.baseline)",
                True,
            )
        if w.kind == "playbook" and not self.phases.baseline.enabled:
            raise field_error(
                "phases.baseline.enabled",
                "a playbook's saving is measured against the idle fleet (the OS alone)",
                False,
            )
        if image != "tiny" and self.host.kind != "local":
            raise field_error("fleet.image", "runs on host.kind local only", shown_image(image))
        return self

    @model_validator(mode="after")
    def _triggers_fit_host(self) -> Spec:
        """Each kind of host runs the trigger methods orchestrator.hosts.methods lists
        (a lab host is a cgroup-v2 VM with NUMA cells: it migrates between nodes and
        reclaims with memory.reclaim). Others are refused here, not mid-run."""
        m, r = self.phases.migrate, self.phases.reclaim
        for trigger, cfg in (("migrate", m), ("reclaim", r)):
            why = refusal(self.host.kind, trigger, cfg.method) if cfg.enabled else None
            if why is not None:
                raise field_error(f"phases.{trigger}.method", why, cfg.method)
        if self.host.kind == "local":
            return self
        if m.enabled and self.host.numa_cells < 2:
            raise field_error("host.numa_cells", "migrate on a lab host needs 2 or more cells", 1)
        return self

    @field_validator("ksm")
    @classmethod
    def _ksm_knobs(cls, v: dict[str, KnobSetting]) -> dict[str, KnobSetting]:
        for name, setting in v.items():
            if isinstance(setting, list):
                try:
                    check_sweep(setting, f"{name} value")
                except PydanticCustomError as e:  # the entry listed twice: ksm.NAME.i
                    where = (e.context or {}).get("field", "")
                    raise field_error(f"{name}.{where}", e.message()) from None
                except ValueError as e:
                    raise field_error(name, str(e)) from None
                for i, value in enumerate(setting):
                    check_ksm_knob(name, value, f"{name}.{i}")
            else:
                check_ksm_knob(name, setting)
        lo, hi = v.get("advisor_min_pages_to_scan"), v.get("advisor_max_pages_to_scan")
        lo_max = max(lo) if isinstance(lo, list) else lo
        hi_min = min(hi) if isinstance(hi, list) else hi
        if isinstance(lo_max, int) and isinstance(hi_min, int) and lo_max > hi_min:
            raise field_error(
                "advisor_min_pages_to_scan", f"above advisor_max_pages_to_scan {hi_min}"
            )
        return v

    @property
    def ksm_fixed(self) -> dict[str, KnobValue]:
        """The knobs given as one value (every trial applies them)."""
        return {k: v for k, v in self.ksm.items() if not isinstance(v, list)}

    @property
    def ksm_sweep(self) -> list[dict[str, KnobValue]]:
        """The swept knobs' settings, one dict per trial dimension value (the cartesian
        product in the spec's order, last knob innermost); [{}] when nothing is swept."""
        swept = [(k, v) for k, v in self.ksm.items() if isinstance(v, list)]
        settings: list[dict[str, KnobValue]] = [{}]
        for name, values in swept:
            settings = [{**s, name: value} for s in settings for value in values]
        return settings

    @property
    def vma_sweep(self) -> list[int]:
        """The host workload's VMA counts as the trial matrix sweeps them ([0]: none)."""
        return self.host_workload.vma_counts if self.host_workload.copies else [0]

    @property
    def trial_count(self) -> int:
        """Trials the matrix expands to, computed without expanding it."""
        factors = (
            len(self.fleet.counts),
            len(self.vma_sweep),
            self.ksm_setting_count,
            self.repeats,
            len(self.kernels),
        )
        return math.prod(factors)

    @property
    def ksm_setting_count(self) -> int:
        """Settings the swept knobs make, computed without building them."""
        return math.prod(len(v) for v in self.ksm.values() if isinstance(v, list))

    def matrix_too_large(self) -> str:
        return (
            f"{len(self.fleet.counts)} fleet sizes x {len(self.vma_sweep)} VMA counts x "
            f"{self.ksm_setting_count} KSM settings x {self.repeats} repeats x "
            f"{len(self.kernels)} kernels make {self.trial_count} trials, more than {MAX_TRIALS}"
        )

    @property
    def workload_seed(self) -> int:
        return self.workload.seed if self.workload.seed is not None else self.seed

    @property
    def host_workload_seed(self) -> int:
        """A seed of its own, so host copies never merge with the guests' pages: the
        prediction counts the two sets apart, and so does the scramble."""
        return self.workload_seed + 1


# pydantic's tags for union members (`constrained-int`, `list[constrained-int]`, `str`);
# anchored at both ends, so that a user's key with a bracket in it is never taken for one.
UNION_TAG_RE = re.compile(r"(constrained-|function-)[\w-]*|[\w-]+\[.*\]|int|str|float|bool")


def clean_loc(loc: tuple[int | str, ...]) -> list[str]:
    """The key path without pydantic's union-member tags such as `list[constrained-int]`."""
    return [str(p) for p in loc if not (isinstance(p, str) and UNION_TAG_RE.fullmatch(p))]


def error_path(e: Any) -> list[str]:
    """Where an error is: its location, plus the field a model check named (field_error)."""
    path = clean_loc(e["loc"])
    if e["type"] == FIELD_ERROR:
        path += str(e["ctx"]["field"]).split(".")
    return path


def pick_error(errors: Sequence[Any]) -> Any:
    """The error to show. For unions pydantic reports one error per member: the deepest
    path is the useful one, and at that path one that is not about the type
    (`count: [1, .. 2000]` is a list too long, not "not an integer")."""
    deepest = max(errors, key=lambda e: len(error_path(e)))
    same = [e for e in errors if error_path(e) == error_path(deepest)]
    return next((e for e in same if not str(e["type"]).endswith("_type")), same[0])


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line: file, dotted key path, message, and the offending value (escaped, and
    shortened: a megabyte of YAML is not echoed)."""
    first = pick_error(err.errors())
    loc = ".".join(printable(shorten(p)) for p in error_path(first))
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if first["type"] == FIELD_ERROR:
        extra = first["ctx"]["shown"]
        value = f", got {extra}" if extra else ""
    elif first["type"] == "extra_forbidden":
        msg, value = "unknown key", ""
    elif first["type"] == "missing" or isinstance(got, dict):
        value = ""
    else:
        value = f", got {shown(got)}"
    return printable(f"{source}: {loc or '(top level)'}: {msg}{value}")


class SpecYAMLError(yaml.MarkedYAMLError):
    """What SpecLoader refuses, at the line of the node."""


class SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what a spec never needs and a hostile file abuses:
    aliases (a "billion laughs" expands a few lines into 10^9 nodes for the validator
    and the error message), nesting deeper than MAX_YAML_DEPTH (Python recursion), more
    than MAX_YAML_NODES values (time), and duplicate keys (YAML keeps the last one
    silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0
        self.nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise SpecYAMLError(
                None,
                None,
                f"alias *{shorten(str(event.anchor))}: aliases are not allowed "
                "in a spec (write the value out)",
                mark,
            )
        self.depth += 1
        self.nodes += 1
        try:
            if self.nodes > MAX_YAML_NODES:
                raise SpecYAMLError(None, None, f"more than {MAX_YAML_NODES} values", mark)
            if self.depth > MAX_YAML_DEPTH:
                raise SpecYAMLError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # unhashable keys: the constructor refuses them itself
            key = self.construct_object(key_node)
            if key in seen:
                raise SpecYAMLError(
                    None,
                    None,
                    f"duplicate key {shown(key)} (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document in text; every parser failure (bad syntax, an integer of 5000
    digits, what SpecLoader refuses) is one UsageError naming the line where known."""
    loader = None
    try:
        loader = SpecLoader(text)  # the reader checks every character right here
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}:" if mark is not None else ""
        what = e.problem or e.context or type(e).__name__
        raise UsageError(printable(f"{source}:{where} not valid YAML: {shorten(what, 200)}")) from e
    except (yaml.YAMLError, ValueError, TypeError, RecursionError, MemoryError) as e:
        # ReaderError (a NUL or control character), int() over the digit limit, ...
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UsageError(printable(f"{source}: not valid YAML: {shorten(first, 200)}")) from e
    finally:
        if loader is not None:
            loader.dispose()


def load_spec_text(text: str, source: str) -> tuple[Spec, dict[str, Any]]:
    """Parse and validate; returns the model and the raw mapping as given."""
    source = printable(source)
    raw = parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping at the top level")
    try:
        return Spec.model_validate(raw), raw
    except ValidationError as e:
        raise UsageError(format_validation_error(source, e)) from e


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, a regular file of at most max_bytes.

    Opened with O_NONBLOCK and checked with fstat before any read: a FIFO without a
    writer would block a plain open, /dev/zero would be read until memory runs out, a
    directory cannot be read at all. Raises UsageError naming the file."""
    name = printable(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{name}: cannot read: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{name}: not a regular file ({file_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            raise UsageError(f"{name}: {st.st_size} bytes, more than {max_bytes} allowed")
        chunks, left = [], max_bytes + 1  # the size may grow under us: read at most this
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise UsageError(f"{name}: cannot read: {e.strerror}") from e
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UsageError(f"{name}: more than {max_bytes} bytes")
    return data


def file_kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a device"}
    return next((k for test, k in kinds.items() if test(mode)), "a special file")


def load_spec(path: Path) -> tuple[Spec, dict[str, Any], str]:
    """Load a spec file; returns (spec, raw mapping, sha256 of the file's bytes)."""
    data = read_regular_file(path, MAX_SPEC_BYTES)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise UsageError(f"{printable(str(path))}: not UTF-8 text (byte {e.start})") from e
    spec, raw = load_spec_text(text, str(path))
    return spec, raw, hashlib.sha256(data).hexdigest()


def check_fits_host(spec: Spec, available_mib: int, source: str) -> None:
    """Refuse a fleet (or lab host) that cannot fit next to the host reserve."""
    source = printable(source)
    if spec.host.kind == "inventory":
        return  # each machine is checked by `lab check` and when a trial starts there
    if spec.host.kind == "labvm":
        vms = len(spec.kernels) if spec.host.boot == "per-kernel" else 1  # alive at once
        need = vms * (spec.host.memory_mib + QEMU_OVERHEAD_MIB) + spec.host_reserve_mib
        if need > available_mib:
            raise UsageError(
                f"{source}: host.memory_mib: {vms} lab host(s) of {spec.host.memory_mib} MiB "
                f"(+{spec.host_reserve_mib} MiB reserve) need {need} MiB, the "
                f"host has {available_mib} MiB available (host.boot: per-trial keeps one)"
            )
        inside = (
            max(spec.fleet.counts) * spec.workload.mib
            + spec.host_workload.copies * spec.host_workload.mib
        )
        if inside > spec.host.memory_mib - 512:
            raise UsageError(
                f"{source}: host.memory_mib: the workloads need {inside} MiB in a "
                f"{spec.host.memory_mib} MiB lab host (keep 512 MiB for its OS)"
            )
        return
    largest = max(spec.fleet.counts)
    need = largest * (spec.fleet.memory_mib + QEMU_OVERHEAD_MIB) + spec.host_reserve_mib
    if need > available_mib:
        raise UsageError(
            f"{source}: fleet.memory_mib: {largest} guests x {spec.fleet.memory_mib} MiB "
            f"(+{QEMU_OVERHEAD_MIB} MiB QEMU each, +{spec.host_reserve_mib} MiB reserve) need "
            f"{need} MiB, the host has {available_mib} MiB available"
        )
    if spec.workload.mib >= spec.fleet.memory_mib:
        raise UsageError(
            f"{source}: workload.mib: {spec.workload.mib} MiB does not fit in a "
            f"{spec.fleet.memory_mib} MiB guest (leave room for its kernel)"
        )
