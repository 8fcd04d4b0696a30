"""The experiment spec: a validated model of one YAML file.

Unknown keys are rejected; every error names the file and the key path, in one line:
`experiments/x.yaml: fleet.memory_mib: Input should be greater than 0, got -1`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import UsageError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
SHARE_TOLERANCE = 1e-6
# KSM knobs across the kernels densitylab supports (6.1 .. 7.x); the host agent checks
# at run time that the running kernel really has the ones a spec names.
KSM_KNOBS = frozenset(
    {
        "run",
        "pages_to_scan",
        "sleep_millisecs",
        "max_page_sharing",
        "merge_across_nodes",
        "use_zero_pages",
        "smart_scan",
        "stable_node_chains_prune_millisecs",
        "advisor_mode",
        "advisor_max_cpu",
        "advisor_min_pages_to_scan",
        "advisor_max_pages_to_scan",
        "advisor_target_scan_time",
    }
)
# KSM correctness checks (images/checks/dlcheck subcommands) a spec can ask for.
CheckName = Literal["mremap-swap", "smart-scan-remerge", "unmerge-intact", "zero-pages", "ksm-stat"]
# Per-guest memory QEMU (TCG) takes beyond guest RAM, for the fits-on-host check (MiB).
QEMU_OVERHEAD_MIB = 96

PositiveInt = Annotated[int, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            "use letters, digits, '_', '.', '-' (at most 48, no quotes, slashes "
            "or XML metacharacters)"
        )
    return value


class Host(Strict):
    """Where the experiment runs: this machine, or one lab-host VM per kernel under test
    (booted from the lab image; TCG here, KVM on real hardware)."""

    kind: Literal["local", "labvm"] = "local"
    memory_mib: Annotated[int, Field(ge=512)] = 4096
    vcpus: PositiveInt = 2
    numa_cells: Annotated[int, Field(ge=1, le=8)] = 2
    boot_timeout_s: Annotated[float, Field(gt=0)] = 240


class Fleet(Strict):
    count: PositiveInt | list[PositiveInt] = 1
    vcpus: PositiveInt = 1
    memory_mib: Annotated[int, Field(ge=64)] = 256
    image: Literal["tiny"] = "tiny"
    accel: Literal["auto", "kvm", "tcg"] = "auto"

    @field_validator("count")
    @classmethod
    def _nonempty_sweep(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and not v:
            raise ValueError("a sweep needs at least one fleet size")
        return v

    @property
    def counts(self) -> list[int]:
        return self.count if isinstance(self.count, list) else [self.count]


class Workload(Strict):
    mib: PositiveInt = 64
    dup: Annotated[float, Field(ge=0, le=1)] = 1.0
    zero: Annotated[float, Field(ge=0, le=1)] = 0.0
    unique: Annotated[float, Field(ge=0, le=1)] = 0.0
    volatile: Annotated[float, Field(ge=0, le=1)] = 0.0
    volatile_rate_pps: Annotated[int, Field(ge=0)] = 0
    fragment_vmas: Annotated[int, Field(ge=0)] = 0
    seed: int | None = None

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> Workload:
        total = self.dup + self.zero + self.unique + self.volatile
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"dup + zero + unique + volatile must sum to 1, got {total:g}")
        return self


KnobValue = int | str


class Boot(Strict):
    timeout_s: Annotated[float, Field(gt=0)] = 120


class Baseline(Strict):
    enabled: bool = True
    timeout_s: Annotated[float, Field(gt=0)] = 90


class Fill(Strict):
    timeout_s: Annotated[float, Field(gt=0)] = 300


class Merge(Strict):
    timeout_s: Annotated[float, Field(gt=0)] = 300
    settle_pct: Annotated[float, Field(gt=0, le=100)] = 1.0
    # Ten, not two: with smart_scan, a page KSM has seen unmergeable for a while (boot
    # content the fill then overwrote) is skipped for up to 8 scans before its new
    # content is even looked at. Over two scans sharing looked settled 7% short of the
    # prediction on the smoke spec; over five it was within 0.1%.
    settle_scans: Annotated[int, Field(ge=1)] = 10


class Hold(Strict):
    duration_s: Annotated[float, Field(ge=0)] = 5


class Attribute(Strict):
    """Scramble the workload's pages after the hold and let KSM settle again: the
    saving that disappears is the workload's own, measured apart from boot leftovers."""

    enabled: bool = True
    timeout_s: Annotated[float, Field(gt=0)] = 120


class Migrate(Strict):
    """Force page migration while KSM pages exist: moving the processes between NUMA
    nodes (needs two nodes), offlining and onlining the memory blocks that hold their
    mergeable pages (targeted, needs memory hotplug), or host-wide compaction (moves
    only what lies below its scanners' meeting point). auto: numa, else compaction."""

    enabled: bool = False
    method: Literal["auto", "compaction", "numa", "offline"] = "auto"
    repeats: Annotated[int, Field(ge=1)] = 3
    settle_s: Annotated[float, Field(ge=0)] = 2


class Reclaim(Strict):
    """Force reclaim of the cgroup that owns the KSM pages, with swap the tool provides.

    `memory.reclaim` (cgroup v2) asks the kernel for `reclaim_mib`; on cgroup v1 the
    owner's limit is stepped down through `v1_limit_steps_mib` (one big step fails
    with EBUSY), then restored."""

    enabled: bool = False
    method: Literal["auto", "memory.reclaim", "v1-limit-steps"] = "auto"
    swap: Literal["zram", "swapfile"] = "zram"
    swap_mib: Annotated[int, Field(gt=0)] = 2048
    reclaim_mib: Annotated[int, Field(gt=0)] = 128
    v1_limit_steps_mib: list[PositiveInt] = [150, 60]
    repeats: Annotated[int, Field(ge=1)] = 1
    settle_s: Annotated[float, Field(ge=0)] = 2

    @field_validator("v1_limit_steps_mib")
    @classmethod
    def _descending(cls, v: list[int]) -> list[int]:
        if not v or v != sorted(v, reverse=True):
            raise ValueError("give at least one step, in descending order")
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
    interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0


class Latency(Strict):
    """How rmap_walk_ksm is timed during migrate/reclaim; auto takes the best the host
    allows (bpf-fentry, kprobe, then the tracepoint proxy: a lower bound)."""

    method: Literal["auto", "bpf-fentry", "kprobe", "tracepoint-proxy", "none"] = "auto"


class HostWorkload(Strict):
    """dlfill processes on the host itself: the fragmented mergeable memory whose KSM
    pages make the old rmap_walk_ksm walk every VMA of one anon_vma."""

    copies: Annotated[int, Field(ge=0)] = 0
    mib: PositiveInt = 64
    fragment_vmas: Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]] = 2000

    @property
    def vma_counts(self) -> list[int]:
        v = self.fragment_vmas
        return v if isinstance(v, list) else [v]


class Spec(Strict):
    name: str
    description: str = ""
    host: Host = Host()
    kernels: list[str] = ["running"]
    fleet: Fleet = Fleet()
    workload: Workload = Workload()
    ksm: dict[str, KnobValue] = {"pages_to_scan": 2000, "sleep_millisecs": 20}
    phases: Phases = Phases()
    sampling: Sampling = Sampling()
    latency: Latency = Latency()
    host_workload: HostWorkload = HostWorkload()
    repeats: PositiveInt = 1
    seed: int = 1
    host_reserve_mib: Annotated[int, Field(ge=0)] = 2048
    # Run by `densitylab check` on every kernel; empty there means all of them.
    checks: list[CheckName] = []

    _check_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @model_validator(mode="after")
    def _kernels_fit_host(self) -> Spec:
        if self.host.kind == "local" and self.kernels != ["running"]:
            raise ValueError(
                "kernels: a local host runs only its running kernel: use "
                "[running], or host.kind: labvm to boot other kernels"
            )
        if self.host.kind == "labvm" and (not self.kernels or "running" in self.kernels):
            raise ValueError(
                "kernels: a lab host boots kernels of the lab image, by label "
                "(e.g. ['6.12', '7.3'])"
            )
        for k in self.kernels:
            check_name(k)
        return self

    @field_validator("ksm")
    @classmethod
    def _ksm_knobs(cls, v: dict[str, KnobValue]) -> dict[str, KnobValue]:
        unknown = sorted(set(v) - KSM_KNOBS)
        if unknown:
            raise ValueError(
                f"unknown KSM knob {', '.join(unknown)} (known: {', '.join(sorted(KSM_KNOBS))})"
            )
        if "run" in v:
            raise ValueError("run is set by densitylab itself per phase; leave it out")
        for k, val in v.items():
            if isinstance(val, str) and not re.fullmatch(r"[A-Za-z0-9_-]+", val):
                raise ValueError(f"{k}: value {val!r} is not a plain word or number")
        return v

    @property
    def workload_seed(self) -> int:
        return self.workload.seed if self.workload.seed is not None else self.seed

    @property
    def host_workload_seed(self) -> int:
        """A seed of its own, so host copies never merge with the guests' pages: the
        prediction counts the two sets apart, and so does the scramble."""
        return self.workload_seed + 1


UNION_TAG_RE = re.compile(r"^(constrained-|function-)|\[|^(int|str|float|bool)$")


def clean_loc(loc: tuple[int | str, ...]) -> list[str]:
    """The key path without pydantic's union-member tags such as `list[constrained-int]`."""
    return [str(p) for p in loc if not (isinstance(p, str) and UNION_TAG_RE.search(p))]


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line: file, dotted key path, message, and the offending value."""
    # For unions pydantic reports one error per member; the deepest path is the useful one.
    first = max(err.errors(), key=lambda e: len(clean_loc(e["loc"])))
    loc = ".".join(clean_loc(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    shown = (
        ""
        if first["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
        else f", got {got!r}"
    )
    if not loc and re.match(r"^[\w.]+: ", msg):  # a model check that names its own field
        return f"{source}: {msg}"
    return f"{source}: {loc or '(top level)'}: {msg}{shown}"


def load_spec_text(text: str, source: str) -> tuple[Spec, dict[str, Any]]:
    """Parse and validate; returns the model and the raw mapping as given."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UsageError(f"{source}:{where} not valid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a mapping at the top level")
    try:
        return Spec.model_validate(raw), raw
    except ValidationError as e:
        raise UsageError(format_validation_error(source, e)) from e


def load_spec(path: Path) -> tuple[Spec, dict[str, Any], str]:
    """Load a spec file; returns (spec, raw mapping, sha256 of the file's bytes)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from e
    spec, raw = load_spec_text(data.decode(errors="replace"), str(path))
    return spec, raw, hashlib.sha256(data).hexdigest()


def check_fits_host(spec: Spec, available_mib: int, source: str) -> None:
    """Refuse a fleet (or lab host) that cannot fit next to the host reserve."""
    if spec.host.kind == "labvm":
        need = spec.host.memory_mib + QEMU_OVERHEAD_MIB + spec.host_reserve_mib
        if need > available_mib:
            raise UsageError(
                f"{source}: host.memory_mib: a {spec.host.memory_mib} MiB lab host "
                f"(+{spec.host_reserve_mib} MiB reserve) needs {need} MiB, the "
                f"host has {available_mib} MiB available"
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
