"""The densitylab command line. The only place that exits, configures logging and draws.

Exit codes: 0 success, 1 a failure (of a trial, of the host), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.errors import DensitylabError, Interrupted, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="VM-density experiments: fleets of QEMU guests, KSM, kernel A/B.",
)
console = Console(stderr=True)
# Off a terminal rich would wrap tables at 80 columns; logs and CI read them whole.
out = Console(width=None if sys.stdout.isatty() else 160)


def fail(e: BaseException) -> None:
    """One line on stderr and the matching exit code."""
    code = 2 if isinstance(e, UsageError) else 130 if isinstance(e, Interrupted) else 1
    print(f"densitylab: {e}", file=sys.stderr)  # one line, never wrapped
    raise typer.Exit(code)


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    no_bpf: Annotated[bool, typer.Option("--no-bpf", help="skip the bpftrace test")] = False,
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


@app.command()
def plan(spec: Path) -> None:
    """Print the expanded trial matrix and an estimated duration; touches nothing."""
    from orchestrator import plan as planmod
    from orchestrator.spec import load_spec

    try:
        s, _, sha = load_spec(spec)
    except DensitylabError as e:
        fail(e)
    trials = planmod.expand(s)
    t = Table(title=f"{s.name} ({len(trials)} trials, spec sha256 {sha[:12]})")
    for col in ("trial", "kernel", "guests", "repeat", "est. s"):
        t.add_column(col, justify="right" if col in ("guests", "repeat", "est. s") else "left")
    total = 0.0
    for tr in trials:
        est = planmod.estimate_s(s, tr)
        total += est
        t.add_row(tr.trial_id, tr.kernel, str(tr.fleet_size), str(tr.repeat), f"{est:.0f}")
    out.print(t)
    out.print(
        f"estimated duration: {total / 60:.1f} min "
        f"(guest RAM {s.fleet.memory_mib} MiB, fill {s.workload.mib} MiB per guest)"
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
    if not outcome.ok:
        for r in outcome.results:
            if r.status != "successful":
                print(f"densitylab: {r.trial_id} {r.status}: {r.reason}", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def clean(
    run_id: Annotated[list[str] | None, typer.Argument(help="only these runs")] = None,
) -> None:
    """Remove what any earlier run left: domains, overlays, KSM settings, samplers."""
    from orchestrator import cleanup

    try:
        removed, errors = cleanup.clean(run_id or None)
    except DensitylabError as e:
        fail(e)
    for r in removed:
        out.print(f"removed {r}", markup=False)
    if not removed:
        out.print("nothing to clean")
    for err in errors:
        print(f"densitylab: clean: {err}", file=sys.stderr)
    raise typer.Exit(1 if errors else 0)


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


@app.command()
def report(
    runs: list[Path],
    out_dir: Annotated[Path | None, typer.Option("--out", help="report folder")] = None,
    host_ram_gib: Annotated[float | None, typer.Option(help="for the capacity model")] = None,
) -> None:
    """Write reports/<name>/index.html and summary.md from run directories."""
    from orchestrator import report as rep

    target = out_dir or Path("reports") / "out" / "-".join(p.name for p in runs)[:120]
    try:
        paths = rep.write_report(runs, target, host_ram_gib=host_ram_gib)
    except DensitylabError as e:
        fail(e)
    out.print(f"report: {paths.index_html}")
    out.print(f"summary: {paths.summary_md}")


@app.command()
def compare(run_a: Path, run_b: Path) -> None:
    """Compare two runs of the same spec."""
    from orchestrator import analysis

    try:
        result = analysis.compare_runs(run_a, run_b)
    except DensitylabError as e:
        fail(e)
    out.print(analysis.render_comparison(result, fmt="text"), markup=False, highlight=False)


def main(argv: list[str] | None = None) -> Any:
    return app(args=argv if argv is not None else sys.argv[1:], prog_name="densitylab")


if __name__ == "__main__":
    main()
