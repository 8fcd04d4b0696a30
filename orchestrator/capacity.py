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
class CapacityResult:
    """table: one row per (kernel, guest_memory_mib); curve: host RAM used (GiB) against
    guests, with and without KSM (median and interval of the bootstrap)."""

    table: pd.DataFrame
    curve: pd.DataFrame
    host_ram_gib: float | None
    reserve_gib: float
    notes: list[str] = field(default_factory=list)


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


def capacity_model(
    tm: pd.DataFrame,
    *,
    host_ram_gib: float | None,
    reserve_gib: float = 2.0,
    kernels: Sequence[str] | None = None,
    n_boot: int = N_BOOT,
    rng: np.random.Generator,
) -> CapacityResult | None:
    """Guests per host from successful trials' saved_profit_mib (MiB), per kernel and guest
    size. host_ram_gib None: the table has savings only and the curve spans 4x the largest
    measured fleet. None when no trial recorded savings."""
    ok = tm[(tm["status"] == "successful") & tm["saved_profit_mib"].notna()]
    ok = ok[ok["guest_memory_mib"].notna()]
    if ok.empty:
        return None
    avail = None if host_ram_gib is None else (host_ram_gib - reserve_gib) * 1024
    order = list(kernels or []) + sorted(set(ok["kernel"]) - set(kernels or []))
    rows, curves = [], []
    for (kernel, g), grp in sorted(
        ok.groupby(["kernel", "guest_memory_mib"]), key=lambda kv: (order.index(kv[0][0]), kv[0][1])
    ):
        fit = fit_savings(
            grp["fleet_size"].to_numpy(),
            grp["saved_profit_mib"].to_numpy(float),
            n_boot=n_boot,
            rng=rng,
        )
        row = _capacity_row(str(kernel), float(g), fit, avail)
        rows.append(row)
        n_max = max(fit.sizes) * 4
        if avail is not None and np.isfinite(row.get("guests_with_ksm_hi", np.nan)):
            n_max = int(max(row["guests_with_ksm_hi"] * 1.15, row["guests_without_ksm"] * 1.15))
        curves.append(_curve(str(kernel), float(g), fit, max(min(n_max, 5000), 2)))
    notes = [] if avail is not None else ["host RAM unknown: pass host_ram_gib for guests/host"]
    return CapacityResult(
        pd.DataFrame(rows), pd.concat(curves, ignore_index=True), host_ram_gib, reserve_gib, notes
    )
