"""What the rmap_walk_ksm collector costs: migration throughput with and without it.

Two host processes share a KSM-merged region fragmented into many VMAs of one anon_vma;
each round migrates every page of theirs (memory-block offline/online of the blocks that
hold them, or NUMA migratepages where the host has two nodes) and counts pages migrated
per second, alternating without / with the collector, so a drift of the machine hits
both sides alike. Prints the medians and the per-pair ratio.

    .venv/bin/python bench/collector_overhead.py [--rounds 5] [--mib 64] [--vmas 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from orchestrator import hostagent
from orchestrator.sampling import Collector
from orchestrator.spec import HostWorkload
from orchestrator.triggers import start_host_workload


def pgmigrate_success() -> int:
    return hostagent.read_vmstat()["pgmigrate_success"]


def migrate_round(pids: list[int], run_id: str, nodes: int, i: int) -> tuple[float, int]:
    """(seconds, pages migrated) for one pass over the processes' pages."""
    from orchestrator import triggers
    from orchestrator.spec import Migrate

    method = "numa" if nodes >= 2 else "offline"
    m0, t0 = pgmigrate_success(), time.monotonic()
    triggers.migrate_once(
        Migrate(enabled=True, method=method), nodes, pids, i, lambda e, d: None, run_id
    )
    return time.monotonic() - t0, pgmigrate_success() - m0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--vmas", type=int, default=2000)
    args = ap.parse_args()
    facts = hostagent.probe_host(check_bpf=True)
    methods = facts["tracing"]["value"]
    if not methods:
        print("no tracing method on this host: nothing to measure")
        return 1
    method, nodes = methods[0], int(facts["numa"]["value"])
    run_id = f"bench-collector-{int(time.time())}"
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        saved = hostagent.STATE_DIR / f"ksm-{run_id}.json"
        hostagent.apply_ksm({"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1}, saved)
        stack.callback(hostagent.restore_ksm, saved)
        procs = start_host_workload(
            HostWorkload(copies=2, mib=args.mib), args.vmas, 7, run_id, stack, Path(tmp)
        )
        pids = [p.pid for p in procs]
        deadline = time.monotonic() + 120
        while hostagent.read_ksm_counters()["pages_sharing"] < args.mib * 200:
            if time.monotonic() > deadline:
                print("KSM did not merge the workload within 120 s")
                return 1
            time.sleep(0.5)
        for i in range(args.rounds):
            plain = migrate_round(pids, run_id, nodes, 2 * i)
            with Collector(Path(tmp) / f"lat{i}.jsonl", method, run_id.replace("-", "_")) as c:
                traced = migrate_round(pids, run_id, nodes, 2 * i + 1)
            walks = len(c.samples())
            rows.append((plain, traced, walks))
            print(
                f"round {i}: without {plain[1] / plain[0]:9.0f} pages/s   "
                f"with {traced[1] / traced[0]:9.0f} pages/s   ({walks} walks timed)"
            )
    rate = [(p[1] / p[0], t[1] / t[0]) for p, t, _ in rows if p[1] and t[1]]
    if not rate:
        print(
            "no round migrated pages on both sides (the kernel refused to offline the "
            "blocks and compaction found nothing of ours): no figure"
        )
        return 1
    ratios = [t / p for p, t in rate]
    print(
        f"\nmethod {method}, {args.vmas} VMAs, {2 * args.mib} MiB merged, "
        f"{'numa' if nodes >= 2 else 'memory-block offline'} migration, {args.rounds} pairs"
    )
    print(f"median pages/s without collector: {statistics.median(p for p, _ in rate):.0f}")
    print(f"median pages/s with collector:    {statistics.median(t for _, t in rate):.0f}")
    print(
        f"with/without throughput ratio: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
