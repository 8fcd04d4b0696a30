"""What the per-process sampler costs: CPU per second and the duration of one sample
for 1, 50 and 200 processes of 64 MiB each (host dlfill processes stand in for guests:
mergeable anonymous memory, like QEMU's RAM).

Two ways side by side, in one run on the same processes, in alternating rounds:
- `smaps each sample`: the VMA layout re-read from /proc/PID/smaps every sample (what
  the sampler did before), which walks page tables under the mmap lock;
- `smaps when maps changes`: ksm_stat every sample, /proc/PID/maps hashed every sample,
  smaps re-read only when that digest changes (or after VMAS_MAX_AGE_S): what the
  sampler does now (orchestrator.agent.sample.VmaCache).

    .venv/bin/python bench/sampler_cost.py [--procs 1,50,200] [--mib 64] [--seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import images, proc  # noqa: E402
from orchestrator.agent import procs, sample  # noqa: E402


def start_processes(n: int, mib: int, out_dir: Path, stack: ExitStack) -> dict[str, int]:
    """n dlfill processes holding `mib` of mergeable pages each (distinct seeds: KSM is
    not needed for the sampler's cost), waited until filled."""
    dlfill = str(images.host_dlfill())
    pids = {}
    for i in range(n):
        out = out_dir / f"p{i}.out"
        with open(out, "wb") as f:
            argv = [dlfill, "--mib", str(mib), "--unique", "1", "--dup", "0", "--mergeable"]
            p = proc.spawn_group([*argv, "--seed", str(i + 1), "--hold"], stdout=f.fileno())
        stack.callback(proc.stop_group, p)
        pids[f"p{i}"] = p.pid
    deadline = time.monotonic() + 600
    for i in range(n):
        out = out_dir / f"p{i}.out"
        while "DLFILL DONE" not in out.read_text():
            if time.monotonic() > deadline:
                raise SystemExit(f"process {i} did not fill within 600 s")
            time.sleep(0.05)
    return pids


def measure(pids: dict[str, int], cached: bool, seconds: float) -> tuple[float, float, float]:
    """Sample at 1 Hz for `seconds`; returns (CPU seconds per second of wall time, median
    duration of one sample in ms, the first sample's ms), the CPU being this process's
    user+system time (CLOCK_PROCESS_CPUTIME_ID: os.times() ticks at 10 ms, too coarse)."""
    ksmd = procs.find_pid_by_comm("ksmd")
    cache = sample.VmaCache() if cached else None
    # The first sample reads every smaps (the cache is cold); a sampler that runs for a
    # trial pays it once, so it is timed apart and left out of the per-second figures.
    t0 = time.perf_counter()
    sample.sample_once(pids, ksmd, cache=cache)
    first_ms = (time.perf_counter() - t0) * 1000
    durations = []
    cpu0, wall0 = time.process_time(), time.monotonic()
    next_tick = wall0
    while time.monotonic() - wall0 < seconds:
        t0 = time.perf_counter()
        sample.sample_once(pids, ksmd, cache=cache)
        durations.append((time.perf_counter() - t0) * 1000)
        next_tick += 1.0
        time.sleep(max(0.0, next_tick - time.monotonic()))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return cpu / wall, statistics.median(durations), first_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", default="1,50,200")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    ways = {"smaps each sample": False, "smaps when maps changes": True}
    for n in (int(x) for x in args.procs.split(",")):
        with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
            pids = start_processes(n, args.mib, Path(tmp), stack)
            got: dict[str, list[tuple[float, float, float]]] = {w: [] for w in ways}
            for _ in range(args.rounds):  # alternate, so drift hits both ways
                for way, cached in ways.items():
                    got[way].append(measure(pids, cached, args.seconds))
            rounds = f"{args.rounds} rounds of {args.seconds:g} s"
            print(f"{n} processes x {args.mib} MiB, 1 Hz, {rounds}:")
            for way, res in got.items():
                cpu = statistics.median(r[0] for r in res) * 100
                ms = statistics.median(r[1] for r in res)
                first = statistics.median(r[2] for r in res)
                print(
                    f"  {way:>23}: {cpu:6.2f}% of one core, one sample {ms:8.2f} ms "
                    f"(median; the first {first:.1f} ms)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
