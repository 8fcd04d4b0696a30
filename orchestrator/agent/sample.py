"""The sampler: KSM counters, ksmd CPU, /proc/vmstat, meminfo and per-process KSM
figures, one JSON line per interval, stamped with CLOCK_MONOTONIC ns."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .fs import PROC, AgentError, parse_key_values, read_text
from .ksm import KSM_DIR, read_ksm_counters
from .procs import find_pid_by_comm, pid_alive

VMSTAT_PREFIXES = (
    "ksm",
    "cow_ksm",
    "pswp",
    "pgmigrate",
    "compact_",
    "numa_pages_migrated",
    "thp_migration",
    "pgsteal",
    "pgscan",
    "swap_ra",
    "workingset",
)
MEMINFO_FIELDS = ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree")
# How often the sampler re-reads a process's VMA layout from smaps (see read_process_ksm).
VMAS_EVERY_S = 10.0
PROCESS_KSM_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")


def process_cpu_s(pid: int, proc: Path = PROC) -> float:
    """utime + stime of pid in seconds, from /proc/PID/stat (fields 14 and 15)."""
    stat = read_text(proc / str(pid) / "stat")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_vmstat(proc: Path = PROC, prefixes: Iterable[str] = VMSTAT_PREFIXES) -> dict[str, int]:
    allv = parse_key_values(read_text(proc / "vmstat"))
    pre = tuple(prefixes)
    return {k: v for k, v in allv.items() if k.startswith(pre)}


def read_meminfo_kib(proc: Path = PROC) -> dict[str, int]:
    allv = parse_key_values(read_text(proc / "meminfo"))
    return {k: allv[k] for k in MEMINFO_FIELDS if k in allv}


def count_mergeable_vmas(smaps_text: str) -> int:
    """VMAs whose VmFlags carry `mg` (MADV_MERGEABLE): QEMU's RAM, fragmented workloads."""
    return sum(
        1 for m in re.finditer(r"^VmFlags:(.*)$", smaps_text, re.M) if "mg" in m.group(1).split()
    )


def read_process_ksm(
    pid: int,
    proc: Path = PROC,
    vmas_cache: dict[int, tuple[float, int]] | None = None,
    vmas_every_s: float = 0.0,
) -> dict[str, int]:
    """Per-process KSM figures (/proc/PID/ksm_stat) and its mergeable VMA count.

    The VMA count needs /proc/PID/smaps, which walks the page tables under the mmap
    lock: its cost grows with guest memory and it disturbs what it measures. The layout
    changes only when a workload maps or fragments its region, so with a cache the
    count is read at most once per `vmas_every_s` per process (ksm_stat every time)."""
    base = proc / str(pid)
    stat = parse_key_values(read_text(base / "ksm_stat")) if (base / "ksm_stat").exists() else {}
    out = {k: stat[k] for k in PROCESS_KSM_FIELDS if k in stat}
    now = time.monotonic()
    cached = vmas_cache.get(pid) if vmas_cache is not None else None
    if cached is not None and now - cached[0] < vmas_every_s:
        out["ram_vmas"] = cached[1]
        return out
    out["ram_vmas"] = count_mergeable_vmas(read_text(base / "smaps"))
    if vmas_cache is not None:
        vmas_cache[pid] = (now, out["ram_vmas"])
    return out


def sample_once(
    pids: Mapping[str, int],
    ksmd_pid: int | None,
    ksm_dir: Path = KSM_DIR,
    proc: Path = PROC,
    vmas_cache: dict[int, tuple[float, int]] | None = None,
    vmas_every_s: float = 0.0,
) -> dict[str, Any]:
    """One sample of everything, stamped with CLOCK_MONOTONIC ns. Gone processes are skipped."""
    sample: dict[str, Any] = {"ts_ns": time.monotonic_ns(), "ksm": read_ksm_counters(ksm_dir)}
    sample["ksmd_cpu_s"] = process_cpu_s(ksmd_pid, proc) if ksmd_pid else None
    sample["vmstat"] = read_vmstat(proc)
    sample["meminfo_kib"] = read_meminfo_kib(proc)
    procs: dict[str, Any] = {}
    for name, pid in pids.items():
        with contextlib.suppress(AgentError):
            procs[name] = {"pid": pid, **read_process_ksm(pid, proc, vmas_cache, vmas_every_s)}
    sample["processes"] = procs
    return sample


def run_sampler(
    pids: Mapping[str, int],
    interval_s: float,
    out: Path,
    stop_after_s: float | None = None,
    parent_pid: int | None = None,
    vmas_every_s: float = VMAS_EVERY_S,
) -> None:
    """Append one JSON line per interval to `out` until SIGTERM/SIGINT (or stop_after_s).

    With parent_pid, it also stops when that process is gone, so a sampler whose
    orchestrator was killed with SIGKILL does not run on forever.
    """
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ksmd = find_pid_by_comm("ksmd")
    vmas_cache: dict[int, tuple[float, int]] = {}
    start = time.monotonic()
    next_tick = start
    with open(out, "a") as f:
        while not stopping:
            sample = sample_once(pids, ksmd, vmas_cache=vmas_cache, vmas_every_s=vmas_every_s)
            f.write(json.dumps(sample) + "\n")
            f.flush()
            next_tick += interval_s
            if stop_after_s is not None and next_tick - start > stop_after_s:
                break
            if parent_pid is not None and not pid_alive(parent_pid):
                break
            # Sleep in short slices so a stop signal ends the sampler promptly.
            while not stopping and time.monotonic() < next_tick:
                time.sleep(min(0.05, max(0.0, next_tick - time.monotonic())))
