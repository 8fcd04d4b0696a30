"""Which workload each timed rmap_walk_ksm was for.

A walk's cost depends on the KSM page walked: how many mappings it has and how many
VMAs the anon_vma of each mapping holds. So a latency figure only means something next
to the workload whose page was walked. Triggers therefore act on one workload at a time
(migrate one process's pages, reclaim one cgroup) inside a recorded window, and every
walk inside a window is that workload's. A walk outside every window (kcompactd, kswapd,
a host-wide compaction) is `unattributed`: it never borrows someone's VMA count. So is a
walk inside a window that no trigger of ours makes, known by its function (rmap_one):
DAMON's access sampling (kdamond, running by default on Debian's 7.3 kernel) walks KSM
pages of any process at any time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

UNATTRIBUTED = "unattributed"
# rmap_one functions of walks that are not a migration's or a reclaim's.
FOREIGN_WALK_PREFIXES = ("damon_", "page_idle_")
TargetKind = str  # "guest" | "host-process" | "host-copy"
Pattern = str  # "distinct" | "one-content"


@dataclass(frozen=True)
class Target:
    """A workload whose pages a trigger acts on.

    `mappings` is what the pattern makes of each KSM page: for distinct duplicate pages
    one mapping per copy; for one-content pages every page of every copy, in chains of
    at most max_page_sharing."""

    name: str
    kind: TargetKind
    pattern: Pattern
    vmas: int | None
    mappings: int | None


@dataclass(frozen=True)
class Window:
    """A trigger acting on one target, on the clock the walks are timed with (ns)."""

    start_ns: int
    end_ns: int
    target: str
    trigger: str


def pattern_mappings(pattern: Pattern, pages: int, copies: int, max_page_sharing: int) -> int:
    """Mappings per KSM page a pattern produces (see Target)."""
    if pattern == "one-content":
        return max(1, min(pages * copies, max_page_sharing))
    return max(1, min(copies, max_page_sharing))


def group_target(name: str, members: Sequence[Target]) -> Target:
    """One target for several processes acted on together (e.g. host copies sharing a
    cgroup): same kind and pattern, the most VMAs any of them has."""
    vmas = [m.vmas for m in members if m.vmas is not None]
    maps = [m.mappings for m in members if m.mappings is not None]
    return Target(
        name,
        members[0].kind,
        members[0].pattern,
        max(vmas) if vmas else None,
        max(maps) if maps else None,
    )


def attribute(
    lat: pd.DataFrame, windows: Sequence[Window], targets: Mapping[str, Target]
) -> pd.DataFrame:
    """Label every walk with target, target_kind, pattern, vmas and mappings (in place,
    and returned). `lat` needs `ts_ns`."""
    n = len(lat)
    lat["target"] = pd.Series([None] * n, index=lat.index, dtype=object)
    lat["target_kind"] = pd.Series([UNATTRIBUTED] * n, index=lat.index, dtype=object)
    lat["pattern"] = pd.Series([None] * n, index=lat.index, dtype=object)
    lat["vmas"] = pd.array([None] * n, dtype="Int64")
    lat["mappings"] = pd.array([None] * n, dtype="Int64")
    if n == 0:
        return lat
    ts = lat["ts_ns"]
    ours = ~foreign_walks(lat)
    for w in windows:
        t = targets.get(w.target)
        if t is None:
            continue
        inside = (ts >= w.start_ns) & (ts <= w.end_ns) & ours
        lat.loc[inside, "target"] = t.name
        lat.loc[inside, "target_kind"] = t.kind
        lat.loc[inside, "pattern"] = t.pattern
        lat.loc[inside, "vmas"] = t.vmas if t.vmas is not None else pd.NA
        lat.loc[inside, "mappings"] = t.mappings if t.mappings is not None else pd.NA
    return lat


def foreign_walks(lat: pd.DataFrame) -> pd.Series:
    """Walks whose function says no trigger of ours made them (False where unknown)."""
    if "rmap_one" not in lat.columns:
        return pd.Series(False, index=lat.index)
    walk = lat["rmap_one"].astype("string")
    return walk.str.startswith(FOREIGN_WALK_PREFIXES).fillna(False).astype(bool)


def measured_mappings(pages_sharing: int | None, pages_shared: int | None) -> float | None:
    """Mean mappings per KSM page over the whole host, from the global counters: each
    KSM page is mapped once by its keeper and once per sharing PTE."""
    if not pages_shared or pages_sharing is None:
        return None
    value = (pages_sharing + pages_shared) / pages_shared
    return value if math.isfinite(value) else None
