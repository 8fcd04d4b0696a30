"""The densitylab command line. The only place that exits, configures logging and draws.

Exit codes: 0 success, 1 a failure (of a trial, of the host), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from orchestrator.errors import DensitylabError, Interrupted, UsageError, printable, shown

if TYPE_CHECKING:
    from orchestrator.spec import Spec

# The largest host RAM the capacity model is asked about (GiB): beyond any machine.
MAX_HOST_RAM_GIB = 1 << 16

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="VM-density experiments: fleets of QEMU guests, KSM, kernel A/B.",
)
console = Console(stderr=True)
# Off a terminal rich would wrap tables at 80 columns; logs and CI read them whole.
out = Console(width=None if sys.stdout.isatty() else 160)


def fail(e: BaseException) -> NoReturn:
    """One line on stderr and the matching exit code."""
    code = 2 if isinstance(e, UsageError) else 130 if isinstance(e, Interrupted) else 1
    # printable: one line, never wrapped, and nothing a file named can do to the terminal
    print(f"densitylab: {printable(str(e))}", file=sys.stderr)
    raise typer.Exit(code)


def check_results_dir(path: Path, option: str) -> None:
    """An output folder that is one, or can become one; checked before any work."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option}: {printable(str(path))} exists and is not a directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option}: {printable(str(parent))} is not a directory")
            break


def check_host_ram_gib(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_HOST_RAM_GIB):
        raise UsageError(
            f"--host-ram-gib: expected a number in (0, {MAX_HOST_RAM_GIB}], got {shown(value)}"
        )


def check_runs(runs: list[Path]) -> None:
    """Every run directory's manifest, validated before the analysis stack is loaded."""
    from orchestrator.manifest import load_manifest

    for run_dir in runs:
        load_manifest(run_dir)


def default_report_dir(runs: list[Path]) -> Path:
    """reports/out/<run names>: the names of the resolved folders (`x/..` is x's parent,
    not `..`), cut to characters a folder name may hold."""
    names = []
    for p in runs:
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", p.resolve().name).lstrip(".")
        names.append(name or "run")
    return Path("reports") / "out" / "-".join(names)[:120]


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    no_bpf: Annotated[bool, typer.Option("--no-bpf", help="skip the BPF attach test")] = False,
) -> None:
    """Probe what this host allows; exit 0 when a density run can proceed, 1 when not."""
    from orchestrator import doctor as doc

    report = doc.run_doctor(check_bpf=not no_bpf)
    if as_json:
        out.print_json(json.dumps(report.as_json()))
    else:
        for line in doc.render_lines(report):
            out.print(line, markup=False, highlight=False)
    raise typer.Exit(0 if report.ok else 1)


def planned_machines(s: Spec) -> int:
    """How many machines share an inventory spec's trials (the inventory file is read,
    no machine is contacted); 1 for any other host."""
    if s.host.kind != "inventory" or s.host.inventory is None:
        return 1
    from orchestrator import inventory

    return len(inventory.load_inventory(Path(s.host.inventory), s.host.pattern))


@app.command()
def plan(
    spec: Path,
    results: Annotated[
        Path, typer.Option(help="earlier runs of the spec here refine the estimate")
    ] = Path("results"),
) -> None:
    """Print the expanded trial matrix and an estimated duration; touches nothing."""
    from orchestrator import plan as planmod
    from orchestrator.results.history import spec_history
    from orchestrator.spec import load_spec

    try:
        s, _, sha = load_spec(spec)
        trials = planmod.expand(s)
        machines = planned_machines(s)
    except DensitylabError as e:
        fail(e)
    est = planmod.estimate(s, trials, spec_history(results, s.name, sha), machines)
    t = Table(title=f"{s.name} ({len(trials)} trials, spec sha256 {sha[:12]})")
    swept = any(isinstance(v, list) for v in s.ksm.values())
    cols = ("trial", "kernel", "guests", *(("KSM setting",) if swept else ()), "repeat", "est. s")
    for col in (*cols, "from"):
        t.add_column(col, justify="right" if col in ("guests", "repeat", "est. s") else "left")
    for tr, (secs, source) in zip(trials, est.trial_s, strict=True):
        setting = (tr.ksm_setting or "",) if swept else ()
        t.add_row(
            tr.trial_id, tr.kernel, str(tr.fleet_size), *setting, str(tr.repeat), f"{secs:.0f}",
            source,
        )  # fmt: skip
    out.print(t)
    out.print(
        f"estimated duration: {est.total_s / 60:.1f} min, of which {est.overhead_s:.0f} s "
        f"outside trials ({est.overhead_from}; guest RAM {s.fleet.memory_mib} MiB, "
        f"fill {s.workload.mib} MiB per guest"
        + (f"; trials side by side on {machines} machines" if machines > 1 else "")
        + ")",
        markup=False,
    )


@app.command()
def run(
    spec: Path,
    resume: Annotated[Path | None, typer.Option(help="run directory to resume")] = None,
    results: Annotated[Path, typer.Option(help="where run directories go")] = Path("results"),
) -> None:
    """Run an experiment: fleet, workload, KSM, samples, run store; prints a summary."""
    from orchestrator import integrity, runner
    from orchestrator.progress import RichProgress, latency_summary, summary_table

    progress = RichProgress(console)
    try:
        # Arguments first: a bad one is refused before the doctor or libvirt is asked.
        check_results_dir(results, "--results")
        if resume is not None:
            from orchestrator.manifest import load_manifest

            load_manifest(resume)
        with progress:
            outcome = runner.run_experiment(spec, results, resume, progress)
    except DensitylabError as e:
        fail(e)
    out.print(summary_table(outcome.results))
    for line in integrity.summary_lines(outcome.store.root):
        out.print(line, markup=False, highlight=False)
    lat = latency_summary(outcome.store.root)
    if lat is not None:
        out.print(lat)
    for r in outcome.results:
        if r.latency_notes:
            out.print(f"{r.trial_id}: latency {r.latency_notes}", markup=False, highlight=False)
    for tid in outcome.skipped:
        out.print(f"skipped {tid}: finished in the resumed run")
    out.print(f"run directory: {outcome.store.root}")
    exit_if_trials_failed(outcome)


@app.command()
def check(
    spec: Path,
    results: Annotated[Path, typer.Option(help="where run directories go")] = Path("results"),
) -> None:
    """KSM correctness checks on every kernel of the spec; exit 1 if any FAILs."""
    from orchestrator import checks

    try:
        outcome = checks.run_checks(spec, results)
    except DensitylabError as e:
        fail(e)
    out.print(check_table(outcome.results))
    out.print(f"run directory: {outcome.store.root}")
    if not outcome.ok:
        for r in outcome.results:
            if r.status == "FAIL":
                print(f"densitylab: {r.kernel} {r.check} FAIL: {r.reason}", file=sys.stderr)
        raise typer.Exit(1)


def check_table(results: list[Any]) -> Table:
    """Checks down, kernels across; each cell the status, its reason and key figures."""
    kernels = list(dict.fromkeys(r.kernel for r in results))
    t = Table(title="KSM checks (kernel x check)", show_lines=True)
    t.add_column("check")
    for k in kernels:
        t.add_column(k)
    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for name in dict.fromkeys(r.check for r in results):
        cells = []
        for k in kernels:
            r = next((r for r in results if r.kernel == k and r.check == name), None)
            cells.append(
                ""
                if r is None
                else f"[{style[r.status]}]{r.status}[/]: {escape(r.reason)}\n"
                f"{escape(r.short_figures())}"
            )
        t.add_row(name, *cells)
    return t


PatternOpt = Annotated[str, typer.Option("--pattern", help="Ansible host pattern")]


@app.command()
def clean(
    run_id: Annotated[list[str] | None, typer.Argument(help="only these runs (exact ids)")] = None,
    force: Annotated[bool, typer.Option(help="clean runs whose owner is still alive too")] = False,
    inventory: Annotated[
        Path | None, typer.Option(help="clean the machines of this Ansible inventory instead")
    ] = None,
    pattern: PatternOpt = "all",
) -> None:
    """Remove what killed runs left: domains, overlays, KSM settings, samplers, swap,
    probes, cgroups. Runs whose owner is alive are skipped unless --force. With
    --inventory: the same on every machine (`lab clean`)."""
    from orchestrator import cleanup

    if inventory is not None:
        clean_machines(inventory, pattern)

    try:
        report = cleanup.clean(run_id or None, force=force)
    except DensitylabError as e:
        fail(e)
    for r in report.removed:
        out.print(f"removed {r}", markup=False, highlight=False)
    for s in report.skipped:
        out.print(f"skipped {s}", markup=False, highlight=False)
    if not report.removed and not report.skipped:
        out.print("nothing to clean")
    for err in report.errors:
        print(f"densitylab: clean: {err}", file=sys.stderr)
    # Runs named on the command line that were left alone were not cleaned as asked.
    raise typer.Exit(1 if report.errors or (run_id and report.skipped) else 0)


@app.command()
def images(
    force: Annotated[bool, typer.Option(help="rebuild even on a cache hit")] = False,
) -> None:
    """Build (or find in the cache) the tiny guest image."""
    from orchestrator import images as img

    try:
        image = img.build_tiny_image(force=force)
    except DensitylabError as e:
        fail(e)
    out.print(
        f"{'cache hit' if image.cache_hit else 'built'} {image.key[:16]}: "
        f"{image.kernel} {image.initrd}"
    )


def check_budget(reserve_mib: int | None, cpu_pct: float | None, settle_s: float | None) -> None:
    """The report's capacity flags, held to the spec's own bounds (capacity:)."""
    from pydantic import ValidationError

    from orchestrator.spec import Capacity

    given = {"reserve_mib": reserve_mib, "ksmd_cpu_max_pct": cpu_pct, "settle_max_s": settle_s}
    try:
        Capacity.model_validate({k: v for k, v in given.items() if v is not None}, strict=False)
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        raise UsageError(f"{flag}: {err['msg']}, got {shown(err.get('input'))}") from e


@app.command()
def report(
    runs: list[Path],
    out_dir: Annotated[Path | None, typer.Option("--out", help="report folder")] = None,
    host_ram_gib: Annotated[float | None, typer.Option(help="for the capacity model")] = None,
    reserve_mib: Annotated[
        int | None, typer.Option(help="host RAM kept free (MiB); default: the spec's capacity:")
    ] = None,
    ksmd_cpu_max_pct: Annotated[
        float | None, typer.Option(help="ksmd CPU budget, % of one core (default: the spec's)")
    ] = None,
    settle_max_s: Annotated[
        float | None, typer.Option(help="longest time to settle allowed (default: the spec's)")
    ] = None,
) -> None:
    """Write reports/<name>/index.html and summary.md from run directories: runs of one
    spec combined, several specs each in its own report and side by side (results/*).
    With KSM settings swept, the capacity table marks those over the budget and names
    the best one."""
    try:
        check_host_ram_gib(host_ram_gib)
        check_budget(reserve_mib, ksmd_cpu_max_pct, settle_max_s)
        check_runs(runs)
        target = out_dir or default_report_dir(runs)
        check_results_dir(target, "--out")
        from orchestrator import report as rep  # pandas, seaborn: only for valid input
        from orchestrator.capacity import Budget
        from orchestrator.progress import LogStatus

        budget = Budget(
            None if reserve_mib is None else float(reserve_mib), ksmd_cpu_max_pct, settle_max_s
        )
        with LogStatus(out, "orchestrator.results", "orchestrator.report"):
            paths = rep.write_campaign(runs, target, host_ram_gib=host_ram_gib, budget=budget)
    except DensitylabError as e:
        fail(e)
    out.print(f"report: {paths.index_html}")
    out.print(f"summary: {paths.summary_md}")


@app.command()
def compare(run_a: Path, run_b: Path) -> None:
    """Compare two runs of the same spec."""
    try:
        check_runs([run_a, run_b])
        from orchestrator.results import analysis, text

        result = analysis.compare_runs(run_a, run_b)
    except DensitylabError as e:
        fail(e)
    out.print(text.render_comparison(result, fmt="text"), markup=False, highlight=False)


def exit_if_trials_failed(outcome: Any) -> None:
    """A line on stderr per trial that did not succeed, and exit 1 (run, reproduce)."""
    if not outcome.ok:
        for r in outcome.results:
            if r.status != "successful":
                print(f"densitylab: {r.trial_id} {r.status}: {r.reason}", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def reproduce(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="a finished run directory")],
    results: Annotated[
        Path | None, typer.Option(help="where the new run goes (default: beside RUN)")
    ] = None,
) -> None:
    """Run RUN's recorded spec again with its seeds, warn about every version that
    differs here, and compare the two runs (RUN is A, the new run B)."""
    from orchestrator import reproduce as repro
    from orchestrator.progress import RichProgress

    try:
        target = results or run_dir.parent
        check_results_dir(target, "--results")
        rep = repro.plan_reproduction(run_dir)  # UsageError before the host is touched
        out.print(f"spec: {rep.spec_source}", markup=False, highlight=False)
        for w in repro.drift_warnings(
            repro.versions_of(rep.manifest), repro.versions_here(rep.spec)
        ):
            print(f"densitylab: warning: {printable(w)}", file=sys.stderr)
        with RichProgress(console) as progress:
            outcome = repro.rerun(rep, target, progress)
        from orchestrator.results import analysis, text

        result = analysis.compare_runs(run_dir, outcome.store.root)
    except DensitylabError as e:
        fail(e)
    out.print(text.render_comparison(result, fmt="text"), markup=False, highlight=False)
    for line in repro.saving_verdict(result.metrics):
        out.print(line, markup=False, highlight=False)
    out.print(f"run directory: {outcome.store.root}")
    exit_if_trials_failed(outcome)


kernels_app = typer.Typer(no_args_is_help=True, help="Kernels built from source for a spec.")
app.add_typer(kernels_app, name="kernels")


def build_progress(label: str) -> Any:
    """A status line per kernel on a terminal; off one, a line every 60 s (CI logs)."""
    last = [0.0]

    def show(steps: int, expected: int | None, elapsed_s: float) -> None:
        of = f"/~{expected}" if expected else ""
        text = f"kernel {label}: {steps}{of} build steps, {elapsed_s:.0f} s"
        if console.is_terminal:
            console.print(text, end="\r", markup=False, highlight=False)
        elif elapsed_s - last[0] >= 60:
            last[0] = elapsed_s
            print(text, file=sys.stderr, flush=True)

    return show


@kernels_app.command("build")
def kernels_build(
    spec: Path,
    force: Annotated[bool, typer.Option(help="rebuild even on a cache hit")] = False,
) -> None:
    """Build (or find in the cache) every `source:` kernel of SPEC; check the others."""
    from orchestrator import kbuild
    from orchestrator.interrupts import InterruptGuard
    from orchestrator.spec import load_spec

    try:
        s, _, _ = load_spec(spec)
        # SIGTERM too becomes an exception: make's process group goes, and the staged
        # build directory with it (nothing half-built enters the cache)
        with InterruptGuard().installed():
            results = kbuild.build_all(s.kernels, force=force, progress=build_progress)
    except DensitylabError as e:
        fail(e)
    for r in results:
        if isinstance(r, kbuild.BuiltKernel):
            cc = r.meta.get("ccache", {})
            how = (
                "cache hit"
                if r.cache_hit
                else f"built in {r.meta['build_s']:.0f} s, ccache {cc.get('hits', 0)} hits "
                f"{cc.get('misses', 0)} misses"
            )
            out.print(
                f"{r.label}: {r.release} ({how}, {r.meta['steps']} build steps) {r.directory}",
                markup=False,
                highlight=False,
            )
        else:
            out.print(f"{r.label}: {r.release} ({r.origin})", markup=False, highlight=False)


# ---------------------------------------------------------------- lab machines (inventory)

lab_app = typer.Typer(no_args_is_help=True, help="Real lab machines from an Ansible inventory.")
app.add_typer(lab_app, name="lab")
lab_vms_app = typer.Typer(no_args_is_help=True, help="Lab-host VMs on loopback SSH ports.")
lab_app.add_typer(lab_vms_app, name="vms")


@lab_app.command("check")
def lab_check(
    inventory: Path,
    pattern: PatternOpt = "all",
    spec: Annotated[Path | None, typer.Option(help="also check the machines can run it")] = None,
) -> None:
    """The doctor on every machine, in parallel; exit 1 naming the machines that are
    unreachable or cannot run --spec."""
    from time import monotonic_ns

    from orchestrator import inventory as inv
    from orchestrator import lab
    from orchestrator.spec import load_spec

    try:
        s = load_spec(spec)[0] if spec is not None else None
        machines = inv.load_inventory(inventory, pattern)
    except DensitylabError as e:
        fail(e)
    t0_ns = monotonic_ns()
    checks = lab.check_all(machines, spec=s)
    elapsed_s = (monotonic_ns() - t0_ns) / 1e9
    t = Table(title=f"{inventory} ({pattern}): {len(machines)} machines, {elapsed_s:.1f} s")
    for col in lab.COLUMNS:
        t.add_column(col, justify="right" if col in ("NUMA", "free MiB") else "left")
    for c in checks:
        t.add_row(*(escape(printable(cell)) for cell in lab.row(c)))
    # Off a terminal, one line per machine whatever its CPU model's length (logs, CI).
    Console(width=None if sys.stdout.isatty() else 1000).print(t)
    bad = [c for c in checks if not c.ok]
    for c in bad:
        print(f"densitylab: {c.machine.label}: {printable('; '.join(c.problems))}", file=sys.stderr)
    raise typer.Exit(1 if bad else 0)


@lab_app.command("prepare")
def lab_prepare(
    inventory: Path,
    pattern: PatternOpt = "all",
    artifacts: Annotated[Path, typer.Option(help="ansible-runner folder")] = Path(
        "results/lab-prepare"
    ),
) -> None:
    """Install what a lab machine needs (apt), ship the host agent and dlfill, start
    libvirtd; idempotent (a second run changes nothing)."""
    from orchestrator import inventory as inv
    from orchestrator import lab

    try:
        machines = inv.load_inventory(inventory, pattern)
        result = lab.prepare(machines, artifacts)
    except DensitylabError as e:
        fail(e)
    for name, st in sorted(result.stats.items()):
        out.print(f"{name}: ok={st['ok']} changed={st['changed']} failed={st['failures']}")
    out.print(f"prepared {len(machines)} machines in {result.elapsed_s:.1f} s")


@lab_app.command("clean")
def lab_clean(inventory: Path, pattern: PatternOpt = "all") -> None:
    """Remove what killed runs left on the machines (processes, cgroups, probes, swap,
    KSM knobs) and the packages densitylab installed (never one they had); a machine a
    live run holds keeps that run's state."""
    clean_machines(inventory, pattern)


def clean_machines(inventory: Path, pattern: str) -> None:
    from orchestrator import inventory as inv
    from orchestrator import lab

    try:
        swept = lab.sweep(inv.load_inventory(inventory, pattern))
    except DensitylabError as e:
        fail(e)
    for name, r in sorted(swept.items()):
        held = f" (held by live run {r.kept_for}: its state left alone)" if r.kept_for else ""
        out.print(f"{name}: removed {', '.join(r.removed) or 'nothing'}{held}", markup=False)
        for line in [*r.errors, *([r.note] if r.note else [])]:
            out.print(f"{name}: {line}", markup=False)
    raise typer.Exit(1 if any(r.errors for r in swept.values()) else 0)


@lab_vms_app.command("start")
def lab_vms_start(
    directory: Path,
    count: Annotated[int, typer.Option(min=1, max=8)] = 2,
    kernel: Annotated[str, typer.Option(help="lab-image kernel label")] = "6.12",
) -> None:
    """Boot lab-host VMs reachable over SSH on loopback; DIR/inventory.ini names them."""
    from orchestrator import labvms

    try:
        vms = labvms.start(directory, count=count, kernel=kernel)
    except DensitylabError as e:
        fail(e)
    out.print(f"{len(vms.names)} lab VMs up in {vms.boot_s:.1f} s: {vms.inventory}", markup=False)


@lab_vms_app.command("stop")
def lab_vms_stop(directory: Path) -> None:
    """Remove the lab VMs started in DIR."""
    from orchestrator import labvms

    try:
        removed = labvms.stop(directory)
    except DensitylabError as e:
        fail(e)
    for r in removed:
        out.print(f"removed {r}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    """The entry point; returns the exit code. A malformed command line (a missing
    argument, `--host-ram-gib abc`) is one line and exit 2, like any other bad input."""
    args = argv if argv is not None else sys.argv[1:]
    try:
        rv = app(args=args, prog_name="densitylab", standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        return 2
    except ClickException as e:
        print(f"densitylab: {printable(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("densitylab: aborted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
