"""Capacity model: from the KSM savings measured at each fleet size, project how many guests
fit on a host of a given RAM, carrying the savings' uncertainty. pandas/numpy only.

Model (stated in every report):
- A guest may touch all of its memory: without KSM each costs guest_memory_mib on the host
  (no QEMU overhead, no balloon). This is the conservative bound the lab can defend.
- The saving of a fleet of N guests is linear in N: S(N) = s N - c (MiB), fitted by
  least squares to the mean general_profit of the trials at each measured fleet size
  (weighted by trial count). With one fleet size only, S(N) = s N (s = saving per guest).
  general_profit is used because it is already net of KSM's own metadata.
- With KSM, N guests use N g - S(N); the host fits the largest N with that <= RAM - reserve,
  i.e. N = floor((RAM - reserve - c) / (g - s)) (MiB).
- Uncertainty: the trials at each fleet size are resampled with replacement (bootstrap),
  the line refitted and N recomputed each time; the table gives the 2.5/97.5 percentiles.
  A fleet size measured once contributes no spread, and projections beyond the largest
  measured fleet are extrapolations: both are said in the table's note.
- KSM settings (a swept `ksm:` knob, trials.ksm_setting) are fitted apart: one row and
  one curve per setting. A budget (Budget: ksmd CPU over merge and hold, % of one core;
  time to settle) marks the settings that break it; of the others, the one that fits
  the most guests (host RAM unknown: saves the most per guest; a tie: the cheaper ksmd)
  is named best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

N_BOOT = 2000
CONFIDENCE = 0.95
MODEL_NOTES = (
    "Each guest may touch all of its memory: without KSM a guest costs guest_memory_mib on "
    "the host (QEMU overhead not counted).",
    "The saving of N guests is modelled as S(N) = s N - c (MiB), a weighted least-squares "
    "line through the mean general_profit at each measured fleet size (one fleet size: "
    "S(N) = s N). general_profit is already net of KSM's own metadata.",
    "With KSM, N guests use N g - S(N); guests per host = floor((RAM - reserve - c) / (g - s)).",
    f"Intervals: {N_BOOT:,} bootstrap resamples of the trials within each fleet size, the "
    "line refitted each time (2.5 and 97.5 percentiles). Savings were measured under this "
    "spec's workload; a projection past the largest measured fleet is an extrapolation.",
)
HOST_RAM_KEYS = {  # doctor facts that may carry the host's RAM, and their scale to GiB
    "mem_total_kib": 1 / (1 << 20),
    "memtotal_kib": 1 / (1 << 20),
    "mem_total_mib": 1 / 1024,
    "mem_total_bytes": 1 / (1 << 30),
    "mem_total_gib": 1.0,
    "ram_gib": 1.0,
}


@dataclass(frozen=True)
class Budget:
    """What a planner allows a KSM setting: ksmd CPU over merge and hold (% of one
    core) and seconds to settle; reserve_mib is kept free on the host. None: no limit
    (reserve: the report's default)."""

    reserve_mib: float | None = None
    ksmd_cpu_max_pct: float | None = None
    settle_max_s: float | None = None

    @property
    def limits(self) -> bool:
        return self.ksmd_cpu_max_pct is not None or self.settle_max_s is not None

    def describe(self) -> str:
        parts = []
        if self.ksmd_cpu_max_pct is not None:
            parts.append(f"ksmd CPU <= {self.ksmd_cpu_max_pct:g}% of one core")
        if self.settle_max_s is not None:
            parts.append(f"settled within {self.settle_max_s:g} s")
        return ", ".join(parts) or "no limit"

    def breaks(self, cpu_pct: float, settle_s: float, settled: bool) -> str:
        """Why a setting breaks the budget ("" when it does not). A setting whose ksmd
        CPU was not measured cannot be shown to keep a CPU limit, so it breaks it."""
        why = []
        cap = self.ksmd_cpu_max_pct
        if cap is not None and not (math.isfinite(cpu_pct) and cpu_pct <= cap):
            shown = f"{cpu_pct:.1f}%" if math.isfinite(cpu_pct) else "not measured"
            why.append(f"ksmd CPU {shown} > {cap:g}%")
        limit = self.settle_max_s
        if limit is not None and not (settled and math.isfinite(settle_s) and settle_s <= limit):
            why.append(f"settle {settle_s:.0f} s > {limit:g} s" if settled else "did not settle")
        return "; ".join(why)


@dataclass(frozen=True)
class CapacityResult:
    """table: one row per (kernel, guest_memory_mib, ksm_setting), with the setting's
    saving per guest, ksmd CPU and settle time, whether it keeps the budget and whether
    it is the best one; curve: host RAM used (GiB) against guests, with and without KSM
    (median and interval of the bootstrap), per setting."""

    table: pd.DataFrame
    curve: pd.DataFrame
    host_ram_gib: float | None
    reserve_gib: float
    notes: list[str] = field(default_factory=list)
    budget: Budget = Budget()

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(self.table["ksm_setting"].astype(str)))

    @property
    def best(self) -> pd.DataFrame:
        """The best setting's row per kernel and guest size (none: nothing kept the budget)."""
        return self.table[self.table["best"]]


def host_ram_from_manifests(manifests: Sequence[dict[str, Any]]) -> float | None:
    """The host RAM in GiB from the first manifest whose host facts carry it, else None."""
    for manifest in manifests:
        host = manifest.get("host") or {}
        memory = host.get("memory")
        if isinstance(memory, dict) and isinstance(memory.get("value"), int | float):
            return float(memory["value"]) / 1024  # the doctor's fact: MemTotal in MiB
        for key, scale in HOST_RAM_KEYS.items():
            if isinstance(host.get(key), int | float) and host[key] > 0:
                return float(host[key]) * scale
    return None


@dataclass(frozen=True)
class SavingsFit:
    """S(N) = s N - c (MiB): point estimate and bootstrap draws of s and c."""

    s: float
    c: float
    s_draws: np.ndarray
    c_draws: np.ndarray
    sizes: list[int]
    counts: list[int]


def _line(x: np.ndarray, w: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of means (rows: replicates, columns: fleet sizes) on x."""
    if len(x) == 1:
        return means[..., 0] / x[0], np.zeros(means.shape[:-1])
    xm = (w * x).sum() / w.sum()
    mm = (means * w).sum(axis=-1) / w.sum()
    s = (w * (x - xm) * (means - mm[..., None])).sum(axis=-1) / (w * (x - xm) ** 2).sum()
    return s, s * xm - mm


def fit_savings(
    fleet_size: np.ndarray, saved_mib: np.ndarray, *, n_boot: int = N_BOOT, rng: np.random.Generator
) -> SavingsFit:
    """Fit S(N) = s N - c to per-trial savings (MiB) at fleet sizes N, with bootstrap draws
    from resampling the trials within each fleet size."""
    sizes = sorted({int(n) for n in fleet_size})
    values = [saved_mib[fleet_size == n] for n in sizes]
    x = np.array(sizes, dtype=float)
    w = np.array([len(v) for v in values], dtype=float)
    means = np.array([v.mean() for v in values])
    boot = np.column_stack(
        [rng.choice(v, size=(n_boot, len(v)), replace=True).mean(axis=1) for v in values]
    )
    s, c = _line(x, w, means[None, :])
    s_draws, c_draws = _line(x, w, boot)
    return SavingsFit(float(s[0]), float(c[0]), s_draws, c_draws, sizes, [len(v) for v in values])


def guests_fitting(avail_mib: float, g_mib: float, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Guests that fit in avail_mib with KSM: floor((avail - c) / (g - s)); never fewer than
    without KSM; NaN where the model breaks down (saving per guest >= guest size)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.floor((avail_mib - c) / (g_mib - s))
    n = np.where(g_mib - s > 0, np.maximum(n, math.floor(avail_mib / g_mib)), np.nan)
    return np.asarray(n, dtype=float)


def _notes(fit: SavingsFit, guests_ksm: float) -> str:
    notes = []
    if len(fit.sizes) == 1:
        notes.append(f"one fleet size (N={fit.sizes[0]}): saving assumed proportional to N")
    single = [n for n, k in zip(fit.sizes, fit.counts, strict=True) if k == 1]
    if single:
        notes.append(f"one trial at N={', '.join(map(str, single))}: its spread is not captured")
    if not math.isnan(guests_ksm) and guests_ksm > max(fit.sizes):
        notes.append(f"extrapolated beyond the largest measured fleet (N={max(fit.sizes)})")
    return "; ".join(notes)


def mean_interval(
    values: np.ndarray, *, n_boot: int, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Mean of values and the 95% bootstrap interval of the mean (NaN: no values; one
    value: no spread, the interval is that value)."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    draws = rng.choice(v, size=(n_boot, len(v)), replace=True).mean(axis=1)
    lo, hi = np.quantile(draws, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(v.mean()), float(lo), float(hi)


def setting_figures(
    grp: pd.DataFrame, budget: Budget, *, n_boot: int, rng: np.random.Generator
) -> dict[str, Any]:
    """A KSM setting's trials: saving per guest (MiB) and ksmd CPU (% of one core), each
    a mean with its 95% bootstrap interval over trials; the slowest settle; the budget."""
    per_guest = grp["saved_profit_mib"].to_numpy(float) / grp["fleet_size"].to_numpy(float)
    cpu = grp["ksmd_cpu_pct"].to_numpy(float) if "ksmd_cpu_pct" in grp else np.array([np.nan])
    sv, sv_lo, sv_hi = mean_interval(per_guest, n_boot=n_boot, rng=rng)
    cp, cp_lo, cp_hi = mean_interval(cpu, n_boot=n_boot, rng=rng)
    settle = grp["settle_s"].astype(float) if "settle_s" in grp else pd.Series([math.nan])
    settled = bool(grp["settled"].fillna(False).astype(bool).all()) if "settled" in grp else True
    settle_max = float(settle.max()) if settle.notna().any() else math.nan
    why = budget.breaks(cp, settle_max, settled)
    return {
        "saving_per_guest_mib": sv,
        "saving_per_guest_mib_lo": sv_lo,
        "saving_per_guest_mib_hi": sv_hi,
        "ksmd_cpu_pct": cp,
        "ksmd_cpu_pct_lo": cp_lo,
        "ksmd_cpu_pct_hi": cp_hi,
        "settle_s_max": settle_max,
        "all_settled": settled,
        "within_budget": not why,
        "over_budget": why,
    }


def mark_best(table: pd.DataFrame) -> pd.Series:
    """Per kernel and guest size, the setting within budget that fits the most guests
    (host RAM unknown: saves the most per guest); a tie goes to the cheaper ksmd."""
    best = pd.Series(False, index=table.index)
    by = "guests_with_ksm" if "guests_with_ksm" in table else "saving_per_guest_mib"
    for _, grp in table[table["within_budget"]].groupby(["kernel", "guest_memory_mib"]):
        ranked = grp.assign(
            _by=grp[by].astype(float).fillna(-math.inf),
            _cpu=grp["ksmd_cpu_pct"].astype(float).fillna(math.inf),
        ).sort_values(["_by", "_cpu"], ascending=[False, True], kind="stable")
        best[ranked.index[0]] = True
    return best


def _capacity_row(
    kernel: str, g: float, fit: SavingsFit, avail_mib: float | None
) -> dict[str, Any]:
    lo_q, hi_q = (1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2
    s_lo, s_hi = np.quantile(fit.s_draws, [lo_q, hi_q])
    row: dict[str, Any] = {
        "kernel": kernel,
        "guest_memory_mib": g,
        "fleet_sizes": ", ".join(map(str, fit.sizes)),
        "trials": sum(fit.counts),
        "saving_per_added_guest_mib": fit.s,
        "saving_per_added_guest_mib_lo": float(s_lo),
        "saving_per_added_guest_mib_hi": float(s_hi),
        "saving_offset_mib": fit.c,
    }
    if avail_mib is None:
        return row | {"note": _notes(fit, math.nan) + "; host RAM unknown"}
    point = guests_fitting(avail_mib, g, np.array([fit.s]), np.array([fit.c]))[0]
    draws = guests_fitting(avail_mib, g, fit.s_draws, fit.c_draws)
    lo, hi = (
        np.nanquantile(draws, [lo_q, hi_q]) if np.isfinite(draws).any() else (math.nan, math.nan)
    )
    return row | {
        "guests_without_ksm": math.floor(avail_mib / g),
        "guests_with_ksm": point,
        "guests_with_ksm_lo": float(lo),
        "guests_with_ksm_hi": float(hi),
        "note": _notes(fit, point),
    }


def _curve(kernel: str, g: float, fit: SavingsFit, n_max: int) -> pd.DataFrame:
    """Host RAM used (GiB) by 1..n_max guests, without KSM and with it (median, interval)."""
    n = np.arange(1, n_max + 1, dtype=float)
    saving = np.clip(fit.s_draws[:, None] * n - fit.c_draws[:, None], 0, None)
    used = (n * g - saving) / 1024
    lo, mid, hi = np.quantile(used, [(1 - CONFIDENCE) / 2, 0.5, (1 + CONFIDENCE) / 2], axis=0)
    point = (n * g - np.clip(fit.s * n - fit.c, 0, None)) / 1024
    return pd.DataFrame(
        {
            "kernel": kernel,
            "guest_memory_mib": g,
            "guests": n.astype(int),
            "used_gib_without_ksm": n * g / 1024,
            "used_gib_with_ksm": point,
            "used_gib_with_ksm_median": mid,
            "used_gib_with_ksm_lo": lo,
            "used_gib_with_ksm_hi": hi,
        }
    )


def _setting_order(settings: pd.Series) -> dict[str, tuple[Any, ...]]:
    """Settings in a natural order: by their numbers (pages_to_scan=100 before =1000)."""

    def key(text: str) -> tuple[Any, ...]:
        parts = [p.partition("=") for p in text.split(",")] if text else []
        return tuple((n, float(v) if v.isdigit() else math.inf, v) for n, _, v in parts)

    return {s: key(s) for s in settings.astype(str).unique()}


def capacity_model(
    tm: pd.DataFrame,
    *,
    host_ram_gib: float | None,
    reserve_gib: float = 2.0,
    kernels: Sequence[str] | None = None,
    budget: Budget = Budget(),
    n_boot: int = N_BOOT,
    rng: np.random.Generator,
) -> CapacityResult | None:
    """Guests per host from successful trials' saved_profit_mib (MiB), per kernel, guest
    size and KSM setting (tm.ksm_setting, "" when none was swept), each setting held to
    the budget. host_ram_gib None: the table has savings only and the curve spans 4x the
    largest measured fleet. None when no trial recorded savings."""
    ok = tm[(tm["status"] == "successful") & tm["saved_profit_mib"].notna()]
    ok = ok[ok["guest_memory_mib"].notna()]
    if ok.empty:
        return None
    if "ksm_setting" not in ok:
        ok = ok.assign(ksm_setting="")
    ok = ok.assign(ksm_setting=ok["ksm_setting"].fillna("").astype(str))
    avail = None if host_ram_gib is None else (host_ram_gib - reserve_gib) * 1024
    order = list(kernels or []) + sorted(set(ok["kernel"]) - set(kernels or []))
    sorder = _setting_order(ok["ksm_setting"])
    rows, curves = [], []
    groups = ok.groupby(["kernel", "guest_memory_mib", "ksm_setting"])
    for (kernel, g, setting), grp in sorted(
        groups, key=lambda kv: (order.index(kv[0][0]), kv[0][1], sorder[kv[0][2]])
    ):
        fit = fit_savings(
            grp["fleet_size"].to_numpy(),
            grp["saved_profit_mib"].to_numpy(float),
            n_boot=n_boot,
            rng=rng,
        )
        row = _capacity_row(str(kernel), float(g), fit, avail)
        row = {"ksm_setting": str(setting), **row}
        row |= setting_figures(grp, budget, n_boot=n_boot, rng=rng)
        rows.append(row)
        n_max = max(fit.sizes) * 4
        if avail is not None and np.isfinite(row.get("guests_with_ksm_hi", np.nan)):
            n_max = int(max(row["guests_with_ksm_hi"] * 1.15, row["guests_without_ksm"] * 1.15))
        curve = _curve(str(kernel), float(g), fit, max(min(n_max, 5000), 2))
        curves.append(curve.assign(ksm_setting=str(setting)))
    table = pd.DataFrame(rows)
    table["best"] = mark_best(table)
    notes = [] if avail is not None else ["host RAM unknown: pass host_ram_gib for guests/host"]
    if budget.limits and not table["within_budget"].any():
        notes.append(f"no KSM setting kept the budget ({budget.describe()})")
    curve_all = pd.concat(curves, ignore_index=True)
    return CapacityResult(table, curve_all, host_ram_gib, reserve_gib, notes, budget)


def best_lines(cap: CapacityResult) -> list[str]:
    """One sentence per kernel and guest size naming the best KSM setting within the
    budget (or saying that none kept it); nothing when no knob was swept."""
    t = cap.table
    if t["ksm_setting"].astype(str).eq("").all():
        return []
    lines = []
    for (kernel, g), grp in t.groupby(["kernel", "guest_memory_mib"], sort=False):
        where = f"kernel {kernel}, {g:g} MiB guests"
        best = grp[grp["best"]]
        if best.empty:
            lines.append(f"{where}: no KSM setting kept the budget ({cap.budget.describe()}).")
            continue
        b = best.iloc[0]
        fits = (
            f", {b['guests_with_ksm']:.0f} guests per host"
            if "guests_with_ksm" in b and pd.notna(b["guests_with_ksm"])
            else ""
        )
        broken = grp[~grp["within_budget"]]
        over = "; ".join(f"{r.ksm_setting} ({r.over_budget})" for r in broken.itertuples())
        lines.append(
            f"{where}: best KSM setting within the budget ({cap.budget.describe()}) is "
            f"{b['ksm_setting']}: {b['saving_per_guest_mib']:.1f} MiB saved per guest, ksmd "
            f"{b['ksmd_cpu_pct']:.1f}% of one core, settled in {b['settle_s_max']:.0f} s{fits}."
            + (f" Over the budget: {over}." if over else "")
        )
    return lines
