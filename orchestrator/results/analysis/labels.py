"""Latency attribution: every walk labelled with the workload whose page it walked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.results.analysis.common import LEVEL_TOLERANCE, UNATTRIBUTED, _codes

__all__ = [
    "LEGACY_KIND_PREFIXES",
    "MAX_COUNT_LEVELS",
    "TARGET_KINDS",
    "WORKLOAD_COLUMNS",
    "count_levels",
    "label_workloads",
    "normalise_latency",
    "workload_label",
]

TARGET_KINDS = ("guest", "host-process", "host-copy", UNATTRIBUTED)

# Runs written before attribution (issue 11) named the lab's workloads this way.
LEGACY_KIND_PREFIXES = (
    ("fragmented-", "host-copy"),
    ("host-dlfill-", "host-copy"),
    ("pattern-", "host-process"),
)

WORKLOAD_COLUMNS = ("target_kind", "pattern", "vmas", "mappings", "rmap_one")

MAX_COUNT_LEVELS = 12  # more levels than this: a continuous count, binned by powers of two


def _category(s: pd.Series) -> pd.Series:
    """s as a categorical of strings (missing stays missing); cheap on a categorical."""
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.rename_categories([str(c) for c in s.cat.categories])
    return s.astype("string").astype("category")


def _masked_category(s: pd.Series, keep: np.ndarray, categories: Sequence[str] = ()) -> pd.Series:
    """Categorical s with rows outside keep set missing; categories listed first."""
    s = _category(s)
    cats = list(dict.fromkeys([*categories, *map(str, s.cat.categories)]))
    s = s.cat.set_categories(cats)
    codes = np.where(keep, s.cat.codes.to_numpy(), -1)
    return pd.Series(pd.Categorical.from_codes(codes, categories=cats), index=s.index)


def _legacy_kinds(target: pd.Series) -> pd.Series:
    """target_kind of a run written before attribution: a named target takes the kind its
    name implies (fragmented copies, pattern processes, else a guest), no target is
    unattributed. Decided per category, not per row."""
    t = _category(target)
    kinds = [
        next((k for p, k in LEGACY_KIND_PREFIXES if str(c).startswith(p)), "guest")
        for c in t.cat.categories
    ]
    lookup = np.array([TARGET_KINDS.index(k) for k in [*kinds, UNATTRIBUTED]])  # -1: none
    codes = lookup[t.cat.codes.to_numpy()]
    return pd.Series(pd.Categorical.from_codes(codes, categories=TARGET_KINDS), index=t.index)


def _na_counts(index: pd.Index) -> pd.Series:
    """An all-missing Int64 column (no per-row Python objects)."""
    n = len(index)
    return pd.Series(pd.arrays.IntegerArray(np.zeros(n, np.int64), np.ones(n, bool)), index=index)


def normalise_latency(lat: pd.DataFrame) -> pd.DataFrame:
    """The latency table under the attribution contract, whatever run wrote it: target,
    target_kind, pattern, vmas and mappings always present. Without target_kind (a run
    written before attribution) a walk with a target gets the kind its name implies, one
    without is "unattributed". An unattributed walk keeps no VMA count, mapping count or
    pattern: before attribution `vmas` was the phase's maximum over every process, the
    label under which reclaim pooled every workload as the fragmented copy's. rmap_one
    (which walk: the rmap_walk_control's function) is kept for every walk, attributed or
    not; missing where the collector could not read it."""
    n = len(lat)
    missing = pd.Series(pd.Categorical.from_codes(np.full(n, -1), categories=[]), index=lat.index)
    target = lat["target"] if "target" in lat.columns else missing
    if "target_kind" in lat.columns:
        kind = _category(lat["target_kind"])
        if UNATTRIBUTED not in kind.cat.categories:
            kind = kind.cat.add_categories([UNATTRIBUTED])
        kind = kind.fillna(UNATTRIBUTED)
    else:
        kind = _legacy_kinds(target)
    kind = _masked_category(kind, np.ones(n, dtype=bool), TARGET_KINDS)
    attributed = (kind != UNATTRIBUTED).to_numpy()
    out = {
        "target": _masked_category(target, attributed),
        "target_kind": kind,
        "pattern": _masked_category(lat.get("pattern", missing), attributed),
        "rmap_one": _category(lat.get("rmap_one", missing)),
    }
    for col in ("vmas", "mappings"):
        values = lat[col] if col in lat.columns else _na_counts(lat.index)
        out[col] = pd.to_numeric(values, errors="coerce").astype("Int64").where(attributed)
    return lat.assign(**out)


def count_levels(values: np.ndarray) -> np.ndarray:
    """The level of each of the distinct non-negative counts in values (same order): counts
    within LEVEL_TOLERANCE of a level's smallest share it (10,000 and 10,003 VMAs are one
    row, so kernels still pair); more than MAX_COUNT_LEVELS levels is a continuous count,
    binned by powers of two. A level is named by the lower median of its counts."""
    values = np.asarray(values, dtype=np.int64)
    if len(values) == 0:
        return values
    order = np.argsort(values, kind="stable")
    v = values[order]
    cluster = np.zeros(len(v), dtype=np.int64)
    start = v[0]
    for i in range(1, len(v)):  # distinct counts only: a few, or a few thousand at most
        if v[i] > start * (1 + LEVEL_TOLERANCE):
            cluster[i], start = cluster[i - 1] + 1, v[i]
        else:
            cluster[i] = cluster[i - 1]
    if cluster[-1] + 1 > MAX_COUNT_LEVELS:
        cluster = np.floor(np.log2(np.maximum(v, 1))).astype(np.int64)
    level = np.empty(len(v), dtype=np.int64)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        level[members] = v[members[(len(members) - 1) // 2]]
    out = np.empty(len(v), dtype=np.int64)
    out[order] = level
    return out


def _level_maps(frames: Sequence[pd.DataFrame]) -> dict[str, dict[int, int]]:
    """Per count column, distinct count -> level, over every frame (so that two runs
    compared share their levels)."""
    maps: dict[str, dict[int, int]] = {}
    for col in ("vmas", "mappings"):
        seen = [np.unique(f[col].dropna().to_numpy(dtype=np.int64)) for f in frames]
        uniq = np.unique(np.concatenate(seen)) if seen else np.array([], dtype=np.int64)
        maps[col] = dict(zip(uniq.tolist(), count_levels(uniq).tolist(), strict=True))
    return maps


def _levelled(s: pd.Series, level: dict[int, int]) -> np.ndarray:
    """Row levels of an Int64 count column (-1: missing), one lookup per distinct value."""
    codes, uniq = pd.factorize(s, use_na_sentinel=True)
    lookup = np.array([level[int(u)] for u in uniq] + [-1], dtype=np.int64)
    return np.asarray(lookup[codes])


def workload_label(kind: str, pattern: Any, vmas: int, mappings: int, walk: Any = None) -> str:
    """A workload row in words: "host-copy, distinct, 10,000 VMAs, 2 mappings/page", and
    the walk's function where known: "..., via try_to_migrate_one"."""
    via = f", via {walk}" if isinstance(walk, str) and walk else ""
    if kind == UNATTRIBUTED:
        return UNATTRIBUTED + via
    parts = [kind]
    if isinstance(pattern, str) and pattern:
        parts.append(pattern)
    if vmas >= 0:
        parts.append(f"{vmas:,} VMA{'s' if vmas != 1 else ''}")
    if mappings >= 0:
        parts.append(f"{mappings:,} mappings/page")
    return ", ".join(parts) + via


def _no_walks(lat: pd.DataFrame) -> pd.Series:
    """An all-missing categorical: a table written before walks were named."""
    codes = np.full(len(lat), -1)
    return pd.Series(pd.Categorical.from_codes(codes, categories=[]), index=lat.index)


def _combined_codes(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, pd.DataFrame]:
    """Row codes of the distinct combinations of integer columns, and the combinations:
    one int64 key per row and one hash factorize (a MultiIndex is ~10x slower)."""
    key = np.zeros(len(next(iter(columns.values()))), dtype=np.int64)
    parts = {}
    for name, col in columns.items():
        c, uniq = pd.factorize(col)
        parts[name] = (np.asarray(uniq), len(uniq))
        key = key * max(len(uniq), 1) + c
    codes, ukeys = pd.factorize(key)
    ukeys = np.asarray(ukeys, dtype=np.int64)
    rows = {}
    for name in reversed(list(columns)):
        uniq, n = parts[name]
        rows[name] = uniq[ukeys % max(n, 1)]
        ukeys = ukeys // max(n, 1)
    return np.asarray(codes), pd.DataFrame({n: rows[n] for n in columns})


def label_workloads(
    lat: pd.DataFrame, levels: dict[str, dict[int, int]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lat (normalised) with a categorical `workload` column, and the workloads: one row
    per label with target_kind, pattern, vmas, mappings (levels; NA: not known) and
    rmap_one (the walk's function), in display order (kinds as TARGET_KINDS, then
    pattern, VMAs, mappings, walk; unattributed last). Walks of different functions are
    different rows: on the old kernel one that stops once the page is unmapped costs
    about half of one that visits every mapping, and one page moved takes one of each.
    """
    levels = levels or _level_maps([lat])
    kind_codes, kinds = _codes(lat["target_kind"])
    pat_codes, patterns = _codes(lat["pattern"])
    walk_codes, walks = _codes(lat["rmap_one"] if "rmap_one" in lat.columns else _no_walks(lat))
    v = _levelled(lat["vmas"], levels["vmas"])
    m = _levelled(lat["mappings"], levels["mappings"])
    codes, rows = _combined_codes(
        {"k": kind_codes, "p": pat_codes, "v": v, "m": m, "w": walk_codes}
    )
    wl = pd.DataFrame(
        {
            "target_kind": kinds[rows["k"].to_numpy()],
            "pattern": [patterns[p] if p >= 0 else None for p in rows["p"]],
            "rmap_one": [walks[w] if w >= 0 else None for w in rows["w"]],
            "vmas": pd.array(np.where(rows["v"] >= 0, rows["v"], 0), dtype="Int64"),
            "mappings": pd.array(np.where(rows["m"] >= 0, rows["m"], 0), dtype="Int64"),
        }
    )
    wl.loc[rows["v"].to_numpy() < 0, "vmas"] = pd.NA
    wl.loc[rows["m"].to_numpy() < 0, "mappings"] = pd.NA
    wl["workload"] = [
        workload_label(str(k), p, int(vv), int(mm), w)
        for k, p, vv, mm, w in zip(
            wl["target_kind"], wl["pattern"], rows["v"], rows["m"], wl["rmap_one"], strict=True
        )
    ]
    rank = {k: i for i, k in enumerate(TARGET_KINDS)}
    wl["_k"] = wl["target_kind"].map(lambda k: rank.get(k, len(rank) - 1) + (k == UNATTRIBUTED))
    by = ["_k", "pattern", "vmas", "mappings", "rmap_one"]
    order = wl.sort_values(by, na_position="first").index
    wl = wl.drop(columns="_k")
    remap = np.empty(len(wl), dtype=np.int64)
    remap[order.to_numpy()] = np.arange(len(wl))
    labels = wl.loc[order, "workload"].tolist()
    cat = pd.Categorical.from_codes(remap[codes], categories=labels)
    return lat.assign(workload=cat), wl.loc[order].set_index("workload")
