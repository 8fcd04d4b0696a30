"""KSM correctness checks per kernel: images/checks/dlcheck run where the spec's host is.

On this machine (`host.kind: local`) the checks run here; for `host.kind: labvm` one
lab-host VM boots each kernel under test and the checks run inside it, through the same
host-agent commands (`ksm-apply`, `swap-on`, `cgroup-create`, ...). Each check prints
one JSON line: PASS, FAIL or SKIP with its reason and figures.

What a run touches and gives back, LIFO on an ExitStack (also on error and Ctrl-C):
the KSM knobs the checks write (saved by `ksm-apply` before anything changes), a swap
device and a memory cgroup for `mremap-swap`. KSM is host-wide: `unmerge-intact` writes
run=2, which unmerges every KSM page of the host, so run the checks alone (the heavy lock).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import pandas as pd

from orchestrator import agentship, proc, store
from orchestrator.agent import fs, probe
from orchestrator.errors import (
    CommandError,
    DensitylabError,
    GuestError,
    HostError,
    UsageError,
)
from orchestrator.interrupts import InterruptGuard, TeardownStack
from orchestrator.kernelspec import label_of, labels
from orchestrator.results import schema
from orchestrator.spec import CheckName, Spec

log = logging.getLogger(__name__)

Status = Literal["PASS", "FAIL", "SKIP"]
STATUSES: tuple[str, ...] = get_args(Status)
ALL_CHECKS: tuple[str, ...] = get_args(CheckName)
CHECKS_DIR = Path(__file__).resolve().parent.parent / "images" / "checks"
LAB_DLCHECK = "/usr/local/bin/dlcheck"
LAB_WORK = "/run/densitylab/checks"
# Knobs dlcheck may write besides `run` (which ksm-apply always saves).
WRITTEN_KNOBS = ("smart_scan", "use_zero_pages")
SWAP_MIB = 256
CHECK_MIB = {"mremap-swap": 16}  # larger: a v1 limit stops near 1 MiB, the rest must go
CHECK_TIMEOUT_S = 300
COMMON_FIGURES = frozenset({"pages", "merged_pages", "scans_to_merge"})


class CheckOutputError(HostError):
    """dlcheck printed no valid result line."""

    def __init__(self, check: str, why: str, output: str):
        self.check = check
        self.why = why
        self.output = output
        super().__init__(f"check {check}: {why}: {output.strip()[-300:]!r}")


@dataclass(frozen=True)
class CheckResult:
    """One check on one kernel."""

    kernel: str
    check: str
    status: Status
    reason: str
    kernel_release: str = ""
    duration_s: float = 0.0
    figures: dict[str, float | str] = field(default_factory=dict)
    line: str = ""  # dlcheck's own line, kept in the run directory as printed

    def short_figures(self, limit: int = 6) -> str:
        """The figures particular to this check (the merge every check starts with left
        out), for a table cell."""
        own = [(k, v) for k, v in self.figures.items() if k not in COMMON_FIGURES]
        return " ".join(f"{k}={v}" for k, v in own[:limit])


def parse_result_line(output: str, check: str, kernel: str, duration_s: float = 0.0) -> CheckResult:
    """The last JSON line of dlcheck's output as a CheckResult.

    Raises CheckOutputError when there is none, it names another check, or its status
    is not PASS, FAIL or SKIP."""
    lines = [ln for ln in output.splitlines() if ln.startswith("{")]
    if not lines:
        raise CheckOutputError(check, "no result line", output)
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise CheckOutputError(check, f"result line is not JSON ({e.msg})", lines[-1]) from e
    if data.get("check") != check:
        raise CheckOutputError(check, f"result names check {data.get('check')!r}", lines[-1])
    status = data.get("status")
    if status not in STATUSES:
        raise CheckOutputError(check, f"status {status!r} is not PASS, FAIL or SKIP", lines[-1])
    figures = {
        k: v
        for k, v in data.items()
        if k not in ("check", "status", "reason", "kernel_release")
        and isinstance(v, int | float | str)
    }
    return CheckResult(
        kernel=kernel,
        check=check,
        status=status,
        reason=str(data.get("reason", "")),
        kernel_release=str(data.get("kernel_release", "")),
        duration_s=duration_s,
        figures=figures,
        line=lines[-1],
    )


# ---------------------------------------------------------------- where checks run


class Target(Protocol):
    """A machine the checks run on: this one, or a lab host (hosts.agent.AgentShell)."""

    def run(self, argv: list[str], timeout_s: float = 120) -> str: ...
    def agent(self, *args: str, timeout_s: float = 120) -> str: ...


class LocalTarget:
    """This machine: the host agent runs as a script, like it does in a lab host."""

    def run(self, argv: list[str], timeout_s: float = 120) -> str:
        return proc.run(argv, timeout_s=timeout_s).stdout

    def agent(self, *args: str, timeout_s: float = 120) -> str:
        return self.run([*agentship.local_agent_argv(), *args], timeout_s)


def build_dlcheck() -> Path:
    """The in-tree dlcheck, made (or brought up to date with its source) by make."""
    proc.run(["make", "-s", "-C", str(CHECKS_DIR)], timeout_s=300)
    return CHECKS_DIR / "dlcheck"


# ---------------------------------------------------------------- one kernel


def ksm_settings(spec: Spec, knobs: dict[str, str]) -> dict[str, str]:
    """The spec's KSM speed plus the knobs dlcheck writes, at their current values: so
    that ksm-apply saves every one of them before the first check."""
    # A swept knob: its first value (the checks test correctness, not the sweep).
    given = {**spec.ksm_fixed, **spec.ksm_sweep[0]}
    settings = {k: str(v) for k, v in given.items() if k in knobs}
    for k in WRITTEN_KNOBS:
        if k in knobs:
            settings.setdefault(k, knobs[k])
    return settings


def exists(t: Target, path: str) -> bool:
    try:
        t.run(["/usr/bin/test", "-e", path])
    except (CommandError, GuestError):
        return False
    return True


def provide_swap(t: Target, work: str, stack: ExitStack) -> tuple[str | None, str]:
    """zram swap (a swap file if no zram device is free): (device, "") or, when neither
    works, (None, why). Its removal is on the stack before it may exist."""
    saved = f"{work}/swap.json"
    stack.callback(undo_if_saved, t, saved, "swap-off")
    errors = []
    for kind in ("zram", "swapfile"):
        try:
            dev = t.agent("swap-on", "--kind", kind, "--mib", str(SWAP_MIB), "--saved", saved)
            return dev.strip(), ""
        except (CommandError, GuestError) as e:
            errors.append(f"{kind}: {e}")
            undo_if_saved(t, saved, "swap-off")  # a half-made one (disksize set, no mkswap)
    return None, "; ".join(errors)


def undo_if_saved(t: Target, saved: str, command: str) -> None:
    """`swap-off` or `ksm-restore` from a saved file, if the step got as far as saving."""
    if exists(t, saved):
        t.agent(command, "--saved", saved, timeout_s=600)


def run_one(t: Target, dlcheck: str, check: str, kernel: str, memcg: str | None) -> CheckResult:
    argv = [dlcheck, check, "--mib", str(CHECK_MIB.get(check, 8)), "--timeout-s", "240"]
    if memcg:
        argv += ["--memcg", memcg]
    t0 = time.monotonic()
    try:
        out = t.run(argv, timeout_s=CHECK_TIMEOUT_S)
        return parse_result_line(out, check, kernel, time.monotonic() - t0)
    except (CommandError, GuestError, CheckOutputError) as e:
        # A crash or a hang is the check's verdict, not the run's end: the next one runs.
        return CheckResult(kernel, check, "FAIL", f"dlcheck: {e}", "", time.monotonic() - t0)


def run_on_target(
    t: Target,
    spec: Spec,
    kernel: str,
    dlcheck: str,
    work: str,
    names: Sequence[str],
    tag: str,
    guard: InterruptGuard,
) -> list[CheckResult]:
    """Every named check on one machine; knobs, swap and cgroup undone on the way out."""
    facts = json.loads(t.agent("probe", "--no-bpf"))
    if not facts["ksm"]["value"]:
        why = f"KSM not usable: {facts['ksm']['how']}"
        return [CheckResult(kernel, c, "SKIP", why) for c in names]
    t.run(["/bin/mkdir", "-p", work])
    results = []
    with TeardownStack(guard) as stack:
        # Last out: the folder, once what was saved in it has been undone.
        stack.callback(t.run, ["/bin/rmdir", "--ignore-fail-on-non-empty", work])
        knobs = facts["ksm"]["knobs"]
        stack.callback(undo_if_saved, t, f"{work}/ksm.json", "ksm-restore")
        t.agent("ksm-apply", "--saved", f"{work}/ksm.json", *kv(ksm_settings(spec, knobs)))
        for check in names:
            guard.check()
            if check == "mremap-swap":
                results.append(mremap_swap(t, dlcheck, kernel, work, tag, stack))
            else:
                results.append(run_one(t, dlcheck, check, kernel, None))
            log.info("%s %s: %s %s", kernel, check, results[-1].status, results[-1].reason)
    return results


def kv(settings: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def mremap_swap(
    t: Target, dlcheck: str, kernel: str, work: str, tag: str, stack: ExitStack
) -> CheckResult:
    """Swap and a memory cgroup of ours for the check, then the check (it joins the
    cgroup and pushes its own pages out through it)."""
    dev, why = provide_swap(t, work, stack)
    if dev is None:
        return CheckResult(kernel, "mremap-swap", "SKIP", f"no swap could be provided: {why}")
    cgroup = f"densitylab-{tag}"
    memcg: str | None
    try:
        memcg = t.agent("cgroup-create", "--cgroup", cgroup).strip()
        stack.callback(t.agent, "cgroup-remove", "--cgroup", cgroup)
    except (CommandError, GuestError) as e:
        log.warning("no memory cgroup for mremap-swap: %s", e)
        memcg = None
    return run_one(t, dlcheck, "mremap-swap", kernel, memcg)


# ---------------------------------------------------------------- lab hosts


def run_in_lab_host(
    spec: Spec, kernel: str, names: Sequence[str], st: store.RunStore, ctx: LabContext
) -> list[CheckResult]:
    """Boot the lab host for `kernel`, copy dlcheck in, run the checks, tear it down."""
    from orchestrator import fleet
    from orchestrator.hosts.agent import AgentShell
    from orchestrator.hosts.labvm import boot_lab_vm

    token = st.run_id.rsplit("-", 1)[-1] + f"{int(time.time()) % 100000:05d}"
    with TeardownStack(ctx.guard) as stack:
        fl = stack.enter_context(fleet.Fleet(ctx.conn, st.run_id, f"check-{kernel}", ctx.domain))
        t = boot_lab_vm(fl, spec, kernel, st.root / "checks", st.run_id, token)
        t.write(LAB_DLCHECK, ctx.dlcheck.read_bytes(), 0o755)
        host = AgentShell(t)
        results = run_on_target(
            host, spec, kernel, LAB_DLCHECK, LAB_WORK, names, "checks", ctx.guard
        )
    return results


@dataclass
class LabContext:
    conn: Any
    domain: str
    guard: InterruptGuard
    dlcheck: Path


@contextmanager
def lab_context(spec: Spec, dlcheck: Path, guard: InterruptGuard) -> Iterator[LabContext]:
    from orchestrator import fleet
    from orchestrator.runner import pick_domain_type

    facts = {"accel": probe.probe_accel()}
    conn = fleet.connect()
    try:
        yield LabContext(conn, pick_domain_type(spec.fleet.accel, facts), guard, dlcheck)
    finally:
        conn.close()


# ---------------------------------------------------------------- a check run


@dataclass
class CheckRun:
    store: store.RunStore
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return not any(r.status == "FAIL" for r in self.results)


def selected(spec: Spec) -> list[str]:
    return list(spec.checks) or list(ALL_CHECKS)


def run_checks(spec_path: Path, results_dir: Path) -> CheckRun:
    """`densitylab check SPEC`: the spec's checks on every kernel, in a run directory of
    their own (manifest.json, checks.parquet, check_figures.parquet, checks/KERNEL.jsonl:
    dlcheck's lines as printed)."""
    from orchestrator.spec import load_spec

    spec, raw, sha = load_spec(spec_path)
    if spec.host.kind == "labvm":  # a kernel the lab image lacks: exit 2 before anything
        from orchestrator import labimage

        lab = labimage.find_lab_image()
        for k in spec.kernels:
            try:
                labimage.resolve_kernel(lab, k)
            except UsageError as e:
                raise UsageError(f"{spec_path}: kernels: {e}") from e
    names = selected(spec)
    dlcheck = build_dlcheck()
    st = store.RunStore.create(results_dir, f"{spec.name}-checks")
    manifest = check_manifest(spec_path, raw, sha, spec, st.run_id, names)
    st.write_manifest(manifest)
    results: list[CheckResult] = []
    guard = InterruptGuard()
    try:
        with guard.installed():
            execute(spec, st, names, dlcheck, guard, results)
    finally:
        manifest["files"] = write_tables(st, results)
        record_results(manifest, results)
        manifest["ended_at"] = store.utc_now()
        st.write_manifest(manifest)
    return CheckRun(st, results)


def run_within(
    spec: Spec, st: store.RunStore, manifest: dict[str, Any], guard: InterruptGuard
) -> list[CheckResult]:
    """The spec's `checks:` as part of `densitylab run`, after its trials: the same
    tables and lines as `densitylab check` writes, in the run's own directory (the
    run's finish_run lists them in the manifest's files). Nothing when the spec asks
    for no checks. A check's FAIL is a result, not the run's failure."""
    if not spec.checks:
        return []
    names = list(spec.checks)
    manifest["checks"] = names
    manifest["dlcheck_sha256"] = store.sha256_file(build_dlcheck())
    results: list[CheckResult] = []
    try:
        execute(spec, st, names, CHECKS_DIR / "dlcheck", guard, results)
    finally:
        write_tables(st, results)
        record_results(manifest, results)
        st.write_manifest(manifest)
    return results


def execute(
    spec: Spec,
    st: store.RunStore,
    names: Sequence[str],
    dlcheck: Path,
    guard: InterruptGuard,
    results: list[CheckResult],
) -> None:
    """Every named check on every kernel (this machine's for `host.kind: local`),
    appended to results as they come (so that an interrupt keeps what ran)."""
    if spec.host.kind == "local":
        work = str(fs.STATE_DIR / f"checks-{st.run_id}")
        results += run_on_target(
            LocalTarget(), spec, "running", str(dlcheck), work, names,
            f"checks-{st.run_id}", guard,
        )  # fmt: skip
        return
    with lab_context(spec, dlcheck, guard) as ctx:
        for kernel in labels(spec.kernels):
            results += kernel_or_failures(spec, kernel, names, st, ctx)


def kernel_or_failures(
    spec: Spec, kernel: str, names: Sequence[str], st: store.RunStore, ctx: LabContext
) -> list[CheckResult]:
    """A lab host that does not boot (or breaks mid-way) fails its kernel's checks with
    the reason, and the next kernel still runs."""
    try:
        return run_in_lab_host(spec, kernel, names, st, ctx)
    except DensitylabError as e:
        from orchestrator.errors import Interrupted

        if isinstance(e, Interrupted):
            raise
        log.error("checks on %s: %s", kernel, e)
        return [CheckResult(kernel, c, "FAIL", f"lab host: {e}") for c in names]


def check_manifest(
    spec_path: Path, raw: dict[str, Any], sha: str, spec: Spec, run_id: str, names: list[str]
) -> dict[str, Any]:
    import os

    from orchestrator import __version__

    return {
        "run_id": run_id,
        "kind": "checks",
        "spec_name": spec.name,
        "spec_path": str(spec_path),
        "spec": raw,
        "spec_sha256": sha,
        "densitylab_version": __version__,
        "git_commit": store.git_commit(CHECKS_DIR.parent.parent),
        "host_kind": spec.host.kind,
        "host_kernel_release": os.uname().release,
        "kernels": [label_of(k) for k in spec.kernels],
        "checks": names,
        "dlcheck_sha256": store.sha256_file(CHECKS_DIR / "dlcheck"),
        "started_at": store.utc_now(),
        "ended_at": None,
        "files": {},
    }


def tables(results: Sequence[CheckResult]) -> dict[str, pd.DataFrame]:
    """Tidy tables: one row per kernel x check, and one per figure of each."""
    checks = pd.DataFrame(
        [
            {
                "kernel": r.kernel,
                "kernel_release": r.kernel_release,
                "check": r.check,
                "status": r.status,
                "reason": r.reason,
                "duration_s": r.duration_s,
            }
            for r in results
        ],
        columns=["kernel", "kernel_release", "check", "status", "reason", "duration_s"],
    )
    figures = pd.DataFrame(
        [
            {"kernel": r.kernel, "check": r.check, "figure": k, "value": float(v)}
            for r in results
            for k, v in r.figures.items()
            if not isinstance(v, str)
        ],
        columns=["kernel", "check", "figure", "value"],
    )
    return {"checks": checks, "check_figures": figures}


def write_tables(st: store.RunStore, results: Sequence[CheckResult]) -> dict[str, str]:
    """checks.parquet, check_figures.parquet and checks/KERNEL.jsonl (dlcheck's lines as
    printed) in the run directory; returns file name -> sha256 of the tables."""
    files = {}
    for name, df in tables(results).items():
        path = st.root / schema.table(name).file
        store.write_table(path, name, df)
        files[path.name] = store.sha256_file(path)
    for kernel in dict.fromkeys(r.kernel for r in results):
        path = st.root / "checks" / f"{kernel}.jsonl"
        lines = [r.line for r in results if r.kernel == kernel and r.line]
        with store.atomic_path(path) as tmp:
            tmp.write_text("".join(f"{ln}\n" for ln in lines))
    return files


def record_results(manifest: dict[str, Any], results: Sequence[CheckResult]) -> None:
    manifest["check_results"] = [
        {"kernel": r.kernel, "check": r.check, "status": r.status, "reason": r.reason}
        for r in results
    ]


# ---------------------------------------------------------------- the report


def read_table(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "checks.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def report_table(run_dirs: Sequence[Path]) -> pd.DataFrame | None:
    """The report's checks section: checks down, kernels across, each cell the status
    with its reason and the check's own figures; None when no run has checks.parquet."""
    rows: dict[str, dict[str, str]] = {}
    for d in run_dirs:
        df = read_table(d)
        if df is None or df.empty:
            continue
        figs = d / "check_figures.parquet"
        f = pd.read_parquet(figs) if figs.is_file() else pd.DataFrame()
        for r in df.itertuples():
            own = f[(f["kernel"] == r.kernel) & (f["check"] == r.check)] if len(f) else f
            shown = [
                f"{x.figure}={x.value:g}"
                for x in own.itertuples()
                if x.figure not in COMMON_FIGURES
            ][:4]
            cell = f"{r.status}: {r.reason}" + (f" ({' '.join(shown)})" if shown else "")
            rows.setdefault(str(r.check), {})[str(r.kernel)] = cell
    if not rows:
        return None
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "check"
    return out.reset_index()
