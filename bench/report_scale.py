"""Scale check for the report: synthetic run directories, then one write_report over all
of them, printing its wall time, the peak RSS of the process that wrote it and the
version of the engine that read the big tables (DuckDB).

Two cases:
  default   one run: 10 million rmap_walk_ksm samples and 1 million KSM samples
  --big     ten runs of one spec: 100 million walks and 10 million KSM samples in all
(plus vmstat at the KSM cadence, 6 counters, in both). The data is generated one run at a
time in a child process, so the peak RSS printed is the report's own; it is written once
into a cache under /var/tmp (reused while complete; --clean removes it at the end).
phase_deltas.parquet is left out on purpose: the report then differences the vmstat
samples itself, the expensive path.

    MPLBACKEND=Agg .venv/bin/python bench/report_scale.py [--big] [--clean]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import tests.synthetic

CACHE = Path("/var/tmp/densitylab-report-scale")
COMPLETE = ".complete"  # written after the last run: a half-generated cache is redone


def generate(parent: Path, run_id: str, latency: int, ksm: int) -> Path:
    """Write one synthetic run (called in the child process)."""
    from tests.synthetic import ALL_TABLES, Synthetic, make_run

    syn = Synthetic(
        run_id=run_id,
        repeats=5,
        ksm_samples=ksm,
        latency_samples=latency,
        tables=ALL_TABLES - {"phase_deltas"},
    )
    return make_run(parent, syn)


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _sizes(run_dirs: list[Path]) -> str:
    import pyarrow.parquet as pq

    rows: dict[str, list[float]] = {}
    for run_dir in run_dirs:
        for p in sorted(run_dir.glob("*.parquet")):
            r = rows.setdefault(p.name, [0, 0.0])
            r[0] += pq.ParquetFile(p).metadata.num_rows
            r[1] += p.stat().st_size / 2**20
    return "\n".join(
        f"  {name:<26} {n:>12,.0f} rows {mib:>8.1f} MiB" for name, (n, mib) in rows.items()
    )


def cached_runs(case: str, runs: int, latency: int, ksm: int) -> list[Path]:
    """The case's run directories, generated (one child process per run) unless cached."""
    parent = CACHE / f"{case}-{runs}x{latency}w-{ksm}k"
    dirs = [parent / f"scale-{i:02d}" for i in range(runs)]
    if (parent / COMPLETE).is_file():
        print(f"cached: {parent}")
        return dirs
    shutil.rmtree(parent, ignore_errors=True)
    parent.mkdir(parents=True)
    t0 = time.monotonic()
    for d in dirs:
        argv = [sys.executable, __file__, "--generate-only", str(parent), "--run-id", d.name]
        argv += ["--latency", str(latency // runs), "--ksm", str(ksm // runs)]
        subprocess.run(argv, check=True, capture_output=True, text=True)
    (parent / COMPLETE).write_text("")
    print(
        f"generated {runs} run(s) in {parent} in {time.monotonic() - t0:.1f} s (largest "
        f"child peak RSS {_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB)"
    )
    return dirs


def main() -> int:
    """Generate (cached, child processes), then report (this process): time and peak RSS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="10 runs: 100 M walks, 10 M KSM samples")
    ap.add_argument("--latency", type=int, help="walk samples in all (default 10 M; --big 100 M)")
    ap.add_argument("--ksm", type=int, help="KSM samples in all (default 1 M; --big 10 M)")
    ap.add_argument("--clean", action="store_true", help="remove the cached data at the end")
    ap.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default="scale-00", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        print(generate(args.generate_only, args.run_id, args.latency, args.ksm))
        return 0
    runs = 10 if args.big else 1
    latency = args.latency or (100_000_000 if args.big else 10_000_000)
    ksm = args.ksm or (10_000_000 if args.big else 1_000_000)
    dirs = cached_runs("big" if args.big else "one", runs, latency, ksm)
    print(_sizes(dirs))
    os.environ.setdefault("MPLBACKEND", "Agg")
    import duckdb

    from orchestrator.report import write_report

    out = dirs[0].parent / "report"
    shutil.rmtree(out, ignore_errors=True)
    rss_before = _rss_mib(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    paths = write_report(dirs, out)
    report_s = time.monotonic() - t0
    print(
        f"report ({runs} run(s), {latency:,} walks, {ksm:,} KSM samples, duckdb "
        f"{duckdb.__version__}): {report_s:.1f} s wall, peak RSS "
        f"{_rss_mib(resource.RUSAGE_SELF):.0f} MiB (after imports {rss_before:.0f} MiB), "
        f"{len(paths.figures)} figures, {len(paths.tables)} tables -> {paths.index_html}"
    )
    if args.clean:
        shutil.rmtree(dirs[0].parent)
        print(f"removed {dirs[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
