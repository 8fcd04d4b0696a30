"""The sampler: KSM counters, ksmd CPU, /proc/vmstat, meminfo and per-process KSM
figures, one JSON line per interval, stamped with CLOCK_MONOTONIC ns."""

from __future__ import annotations

import contextlib
import hashlib
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
# The VMA layout (mergeable VMAs, from smaps) is re-read when /proc/PID/maps changes,
# and at the latest after VMAS_MAX_AGE_S: madvise(MADV_MERGEABLE) over a whole VMA
# changes its flags but not its line in maps.
VMAS_MAX_AGE_S = 60.0
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


class VmaCache:
    """Mergeable-VMA counts per process, re-read from smaps only when needed.

    /proc/PID/smaps walks every page table under the mmap lock: at 1 Hz over a fleet
    its cost grows with guest memory and fleet size, and it disturbs what it measures.
    /proc/PID/maps lists the same VMAs without touching a page table, so its digest
    tells when the layout changed; smaps is read then, or after max_age_s."""

    def __init__(self, max_age_s: float = VMAS_MAX_AGE_S) -> None:
        self.max_age_s = max_age_s
        self.entries: dict[int, tuple[bytes, float, int]] = {}  # pid -> digest, read at, count
        self.smaps_reads = 0

    def mergeable_vmas(self, pid: int, proc: Path = PROC) -> int:
        """The count for pid; raises AgentError when its files cannot be read (gone)."""
        base = proc / str(pid)
        try:
            digest = hashlib.blake2b((base / "maps").read_bytes(), digest_size=16).digest()
        except OSError as e:
            raise AgentError(f"{base / 'maps'}: {e.strerror or e}") from e
        now = time.monotonic()
        hit = self.entries.get(pid)
        if hit is not None and hit[0] == digest and now - hit[1] < self.max_age_s:
            return hit[2]
        count = count_mergeable_vmas(read_text(base / "smaps"))
        self.smaps_reads += 1
        self.entries[pid] = (digest, now, count)
        return count

    def forget_except(self, pids: Iterable[int]) -> None:
        keep = set(pids)
        self.entries = {p: e for p, e in self.entries.items() if p in keep}


def read_process_ksm(pid: int, proc: Path = PROC, cache: VmaCache | None = None) -> dict[str, int]:
    """Per-process KSM figures (/proc/PID/ksm_stat, every call) and its mergeable VMA
    count (smaps every call without a cache; through the cache's maps digest with one)."""
    base = proc / str(pid)
    stat = parse_key_values(read_text(base / "ksm_stat")) if (base / "ksm_stat").exists() else {}
    out = {k: stat[k] for k in PROCESS_KSM_FIELDS if k in stat}
    if cache is None:
        out["ram_vmas"] = count_mergeable_vmas(read_text(base / "smaps"))
    else:
        out["ram_vmas"] = cache.mergeable_vmas(pid, proc)
    return out


def sample_once(
    pids: Mapping[str, int],
    ksmd_pid: int | None,
    ksm_dir: Path = KSM_DIR,
    proc: Path = PROC,
    cache: VmaCache | None = None,
) -> dict[str, Any]:
    """One sample of everything, stamped with CLOCK_MONOTONIC ns. Gone processes are skipped."""
    sample: dict[str, Any] = {"ts_ns": time.monotonic_ns(), "ksm": read_ksm_counters(ksm_dir)}
    sample["ksmd_cpu_s"] = process_cpu_s(ksmd_pid, proc) if ksmd_pid else None
    sample["vmstat"] = read_vmstat(proc)
    sample["meminfo_kib"] = read_meminfo_kib(proc)
    procs: dict[str, Any] = {}
    for name, pid in pids.items():
        with contextlib.suppress(AgentError):
            procs[name] = {"pid": pid, **read_process_ksm(pid, proc, cache)}
    sample["processes"] = procs
    if cache is not None:
        cache.forget_except(pids.values())
    return sample


def run_sampler(
    pids: Mapping[str, int],
    interval_s: float,
    out: Path,
    stop_after_s: float | None = None,
    parent_pid: int | None = None,
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
    cache = VmaCache()
    start = time.monotonic()
    next_tick = start
    with open(out, "a") as f:
        while not stopping:
            sample = sample_once(pids, ksmd, cache=cache)
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
