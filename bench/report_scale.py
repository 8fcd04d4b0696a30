"""Scale check for the report: 10 million rmap_walk_ksm samples and 1 million KSM samples
(plus vmstat at the same cadence, 6 counters) in a temporary run directory, then one
write_report, printing its wall time and the peak RSS of the process that wrote it.

The data is generated in a child process, so the peak RSS printed is the report's own.
phase_deltas.parquet is left out on purpose: the report then differences the vmstat
samples itself, the expensive path.

    MPLBACKEND=Agg .venv/bin/python bench/report_scale.py [--latency 10000000] [--ksm 1000000]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import tests.synthetic


def generate(parent: Path, latency: int, ksm: int) -> Path:
    """Write the synthetic run (called in the child process)."""
    from tests.synthetic import ALL_TABLES, Synthetic, make_run

    syn = Synthetic(
        run_id="scale-0001",
        repeats=5,
        ksm_samples=ksm,
        latency_samples=latency,
        tables=ALL_TABLES - {"phase_deltas"},
    )
    return make_run(parent, syn)


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _sizes(run_dir: Path) -> str:
    import pyarrow.parquet as pq

    parts = []
    for p in sorted(run_dir.glob("*.parquet")):
        rows = pq.ParquetFile(p).metadata.num_rows
        parts.append(f"  {p.name:<26} {rows:>12,} rows {p.stat().st_size / 2**20:>8.1f} MiB")
    return "\n".join(parts)


def main() -> int:
    """Generate (child process), then report (this process) and print time and peak RSS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=int, default=10_000_000, help="walk samples")
    ap.add_argument("--ksm", type=int, default=1_000_000, help="KSM samples")
    ap.add_argument("--keep", type=Path, help="write here and keep it (default: a temp dir)")
    ap.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        print(generate(args.generate_only, args.latency, args.ksm))
        return 0
    with tempfile.TemporaryDirectory(prefix="densitylab-scale-") as tmp:
        parent = args.keep or Path(tmp)
        t0 = time.monotonic()
        argv = [
            sys.executable,
            __file__,
            "--generate-only",
            str(parent),
            "--latency",
            str(args.latency),
            "--ksm",
            str(args.ksm),
        ]
        run_dir = Path(
            subprocess.run(argv, check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        gen_s = time.monotonic() - t0
        print(
            f"generated {run_dir} in {gen_s:.1f} s (child peak RSS "
            f"{_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB)\n{_sizes(run_dir)}"
        )
        os.environ.setdefault("MPLBACKEND", "Agg")
        from orchestrator.report import write_report

        rss_before = _rss_mib(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        paths = write_report([run_dir], parent / "report")
        report_s = time.monotonic() - t0
        print(
            f"report: {report_s:.1f} s wall, peak RSS {_rss_mib(resource.RUSAGE_SELF):.0f} "
            f"MiB (after imports {rss_before:.0f} MiB), {len(paths.figures)} figures, "
            f"{len(paths.tables)} tables -> {paths.index_html}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
