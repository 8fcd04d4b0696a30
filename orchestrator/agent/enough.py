"""Enough walks: move or reclaim pages in batches and stop once every walk function's
median walk time is known to within a set width.

The old kernel's walk at 10,000 VMAs costs tens of milliseconds, so a trigger over
every sampled page spends minutes on walks whose median was pinned after a few hundred.
While the BPF collector runs it appends whole ring-buffer records to its raw file a few
times a second (trace.run_fentry_collector); a WalkWatch reads the records added since
its window began, keeps this process's own walks (the process that calls move_pages or
writes memory.reclaim is the one that walks), and after each batch asks, per walk
function (rmap_one), for at least `min_walks` walks and a distribution-free 95% interval
of the median no wider than +-ci_pct. Records still in the ring are read at the next
check: a late read only makes the stop later, never earlier.

Stopping on a rule biases nothing for a fixed-cost walk, but it is optional stopping:
min_walks keeps the first look from being a lucky one, and every window records why it
stopped and what it saw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bpf, memory

Z95 = 1.96
RECLAIM_STEP_BYTES = 1 << 20  # one memory.reclaim write per MiB between checks


def median_ci_rel(sorted_ns: list[int]) -> float:
    """Half-width of the order-statistic 95% interval of the median, relative to it."""
    n = len(sorted_ns)
    if n == 0:
        return math.inf
    k = Z95 * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - k)), min(n - 1, math.ceil(n / 2 + k))
    med = sorted_ns[n // 2]
    return (sorted_ns[hi] - sorted_ns[lo]) / (2 * med) if med > 0 else math.inf


@dataclass
class WalkWatch:
    """This process's walks appended to the collector's raw file since the watch began."""

    raw: Path
    ci_pct: float
    min_walks: int
    tgid: int = field(default_factory=os.getpid)
    offset: int = -1
    walks: dict[int, list[int]] = field(default_factory=dict)  # rmap_one -> durations

    def __post_init__(self) -> None:
        if self.offset < 0:
            self.offset = self._whole_records_end()

    def _whole_records_end(self) -> int:
        size = self.raw.stat().st_size if self.raw.exists() else 0
        return size - size % bpf.RECORD_SLOT  # a write may be half visible

    def read(self) -> None:
        end = self._whole_records_end()
        if end <= self.offset:
            return
        with open(self.raw, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(end - self.offset)
        self.offset = end
        for _ts, dur, _tid, tgid, func, _comm in bpf.records(chunk):
            if tgid == self.tgid:
                self.walks.setdefault(func, []).append(dur)

    def widest_ci_pct(self) -> float:
        return 100 * max((median_ci_rel(sorted(d)) for d in self.walks.values()), default=math.inf)

    def tight(self) -> bool:
        """Enough walks of every function seen so far, each median within ci_pct."""
        self.read()
        if not self.walks or min(len(d) for d in self.walks.values()) < self.min_walks:
            return False
        return self.widest_ci_pct() <= self.ci_pct

    def summary(self, stopped: bool) -> dict[str, Any]:
        return {
            "stopped": "interval tight" if stopped else "every page",
            "walks_seen": sum(len(d) for d in self.walks.values()),
            "ci_pct": round(self.widest_ci_pct(), 2) if self.walks else None,
        }


def stop_detail(r: dict[str, Any]) -> str:
    """How a watched window ended, for its event: 'interval tight after 812 walks, +-4.1%'."""
    if not r["walks_seen"]:
        return "no walks in this window"  # its KSM pages moved or went with another's
    ci = r.get("ci_pct")
    width = f", +-{ci}%" if ci is not None else ""
    return f"{r['stopped']} after {r['walks_seen']} walks{width}"


WatchFactory = Callable[[], WalkWatch | None]


def batches(n: int, first: int, step: int) -> list[tuple[int, int]]:
    """[lo, hi) index ranges: one of `first` items, then of `step`, up to n."""
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + (first if lo == 0 else step))
        out.append((lo, hi))
        lo = hi
    return out


def move_until_tight(
    pid: int, addrs: list[int], node: int, watch: WalkWatch | None
) -> dict[str, Any]:
    """move_pages of addrs to node, in batches when watched, stopping once tight; the
    counts of every batch summed, plus how the window ended."""
    if watch is None:
        return memory.move_pages(pid, addrs, node)
    total: dict[str, Any] = {}
    stopped = False
    for lo, hi in batches(len(addrs), watch.min_walks, max(50, watch.min_walks // 2)):
        add_counts(total, memory.move_pages(pid, addrs[lo:hi], node))
        if hi < len(addrs) and watch.tight():
            stopped = True
            break
    watch.read()
    return total | watch.summary(stopped)


def add_counts(total: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum move_pages results: ints add up, per-reason dicts add per reason."""
    for k, v in more.items():
        if isinstance(v, dict):
            inner = total.setdefault(k, {})
            for r, c in v.items():
                inner[r] = inner.get(r, 0) + c
        elif isinstance(v, int):
            total[k] = total.get(k, 0) + v
        else:
            total[k] = v


def reclaim_until_tight(cg: Path, nbytes: int, watch: WalkWatch | None) -> dict[str, Any]:
    """memory.reclaim of nbytes, a MiB at a time when watched, stopping once tight.
    result: all, or partly when the kernel could not reclaim some step in full."""
    if watch is None:
        return {"result": "all" if memory.memcg_reclaim_v2(cg, nbytes) else "partly"}
    done, partly, stopped = 0, False, False
    while done < nbytes:
        step = min(RECLAIM_STEP_BYTES, nbytes - done)
        partly |= not memory.memcg_reclaim_v2(cg, step)
        done += step
        if done < nbytes and watch.tight():
            stopped = True
            break
    watch.read()
    return {"result": "partly" if partly else "all", "reclaimed_mib": done >> 20} | watch.summary(
        stopped
    )
