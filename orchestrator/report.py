"""Reports from run directories: index.html with its figures beside it (PNG, and PDF and
SVG for a paper), summary.md, and every table as CSV and as a LaTeX tabular (.tex; the
tables as the report shows them also as <name>_display.tex). The only module that imports
seaborn and matplotlib.

A report is a pure function of its run directories (fixed seed, no timestamps, PNGs
without a software stamp): it never touches the host, and the same runs give the same
files. Large tables are never drawn point by point: the analysis hands over binned time
series, ECDF points and VMA bins of bounded size.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from orchestrator import abdiff, checks, integrity, walkcost
from orchestrator.capacity import MODEL_NOTES, Budget, CapacityResult, best_lines
from orchestrator.errors import UsageError
from orchestrator.files import atomic_path
from orchestrator.results import analysis as an
from orchestrator.results import campaign
from orchestrator.results import text as tx
from orchestrator.walkcost import WalkCost

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
FIG_DPI = 100
KEY_COUNTERS = (  # shown in the per-phase table; the CSV has every counter
    "pswpout",
    "pswpin",
    "ksm_swpin_copy",
    "cow_ksm",
    "pgmigrate_success",
    "compact_migrate_scanned",
    "full_scans",
    "pages_sharing",
    "general_profit_bytes",
    "ksmd_cpu_s",
)
HEADLINE_METRICS = (
    "saved_profit_mib",
    "saved_per_guest_mib",
    "settle_s",
    "merge_rate_90_pages_per_s",
    "ksmd_cpu_s",
    "ksmd_cpu_s_per_gib",
)
MISSING = "not recorded in this run"


@dataclass(frozen=True)
class ReportPaths:
    """What write_report wrote: the page, the markdown summary, figures and CSV tables."""

    out_dir: Path
    index_html: Path
    summary_md: Path
    figures: dict[str, Path] = field(default_factory=dict)  # PNG, by figure name
    tables: dict[str, Path] = field(default_factory=dict)  # CSV, by table name
    figure_files: dict[str, list[Path]] = field(default_factory=dict)  # PNG, PDF, SVG
    latex: dict[str, Path] = field(default_factory=dict)  # .tex tabulars, by file stem
    analysis: an.Analysis | None = None  # what the page shows


# --------------------------------------------------------------------------- style


@contextmanager
def figure_style() -> Iterator[None]:
    """One look for every figure, without touching matplotlib's global state."""
    with (
        sns.axes_style("whitegrid"),
        sns.plotting_context("notebook", font_scale=0.85),
        mpl.rc_context(
            {
                "axes.titleweight": "bold",
                "figure.titlesize": 13,
                "figure.titleweight": "bold",
                "legend.fontsize": 8,
                "legend.title_fontsize": 9,
                "axes.titlesize": 10.5,
            }
        ),
    ):
        yield


def kernel_palette(kernels: Sequence[str]) -> dict[str, Any]:
    """Kernel -> colour, the same in every figure (reference kernel first)."""
    return dict(zip(kernels, sns.color_palette("colorblind", max(len(kernels), 1)), strict=False))


def _new_figure(
    ncols: int = 1, nrows: int = 1, height: float = 4.4, **kw: Any
) -> tuple[Figure, Any]:
    fig = Figure(figsize=(max(7.5, 4.6 * ncols), height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes.ravel()


# --------------------------------------------------------------------------- figures


def fig_ksm_timeline(timeline: pd.DataFrame, palette: dict[str, Any]) -> Figure:
    """KSM savings (MiB) over time (s) per kernel and fleet size: median over trials, band
    from min to max."""
    d = timeline.assign(fleet=timeline["fleet_size"].astype(int).astype(str) + " guests")
    panels = [
        (c, t)
        for c, t in (
            ("profit_mib", "general_profit (net of KSM metadata)"),
            ("sharing_mib", "pages_sharing x page size"),
        )
        if c in d
    ]
    fig, axes = _new_figure(1, len(panels), height=3.4, sharex=True)
    for i, (ax, (col, title)) in enumerate(zip(axes, panels, strict=True)):
        sns.lineplot(
            data=d,
            x="t_s",
            y=col,
            hue="kernel",
            style="fleet",
            palette=palette,
            estimator="median",
            errorbar=("pi", 100),
            ax=ax,
            legend=i == 0,
        )
        ax.set(title=title, xlabel="time since trial start (s)", ylabel="saved (MiB)")
    axes[0].legend(title="kernel / fleet", loc="upper left")
    fig.suptitle("KSM savings over time")
    return fig


def _points_by_fleet(
    ax: Axes, d: pd.DataFrame, y: str, palette: dict[str, Any], legend: bool
) -> None:
    """Each trial as a dot, the median per kernel as a bar outline, side by side by fleet."""
    d = d.assign(fleet=d["fleet_size"].astype(int).astype(str))
    order = sorted(d["fleet"].unique(), key=int)
    hue_order = [k for k in palette if k in set(d["kernel"])]
    sns.barplot(
        data=d,
        x="fleet",
        y=y,
        hue="kernel",
        estimator="median",
        errorbar=None,
        order=order,
        hue_order=hue_order,
        palette=palette,
        fill=False,
        ax=ax,
        legend=legend,
    )
    # A swarm, not a strip: jitter would draw random numbers and the same runs would not
    # give the same PNG.
    sns.swarmplot(
        data=d,
        x="fleet",
        y=y,
        hue="kernel",
        order=order,
        hue_order=hue_order,
        palette=palette,
        dodge=True,
        size=5,
        ax=ax,
        legend=False,
    )
    if legend and ax.get_legend_handles_labels()[0]:  # no bars when every value is NaN
        ax.legend(title="kernel (bar: median, dots: trials)", loc="best")


def fig_merge_rate(trials: pd.DataFrame, palette: dict[str, Any]) -> Figure:
    """Merge rate (pages/s) to 50% and 90% of the final pages_sharing, per trial."""
    ok = an.successful(trials)
    fig, axes = _new_figure(2)
    for i, (ax, pct) in enumerate(zip(axes, (50, 90), strict=True)):
        col = f"merge_rate_{pct}_pages_per_s"
        _points_by_fleet(ax, ok.dropna(subset=[col]), col, palette, legend=i == 0)
        ax.set(
            title=f"to {pct}% of final pages_sharing",
            xlabel="fleet size (guests)",
            ylabel="merge rate (pages/s)",
        )
    fig.suptitle("KSM merge rate")
    return fig


def fig_ksmd_cpu(trials: pd.DataFrame, palette: dict[str, Any]) -> Figure:
    """ksmd CPU time per trial (s) and per GiB saved (s/GiB)."""
    ok = an.successful(trials)
    fig, axes = _new_figure(2)
    panels = (
        ("ksmd_cpu_s", "ksmd CPU (s)", "per trial"),
        ("ksmd_cpu_s_per_gib", "ksmd CPU per GiB saved (s/GiB)", "per GiB saved"),
    )
    for i, (ax, (col, ylabel, title)) in enumerate(zip(axes, panels, strict=True)):
        _points_by_fleet(ax, ok.dropna(subset=[col]), col, palette, legend=i == 0)
        ax.set(title=title, xlabel="fleet size (guests)", ylabel=ylabel)
    fig.suptitle("ksmd CPU cost")
    return fig


METHOD_STYLES = {"tracepoint": "-", "kprobe": "-", "bpf-fentry": "-", "tracepoint-proxy": ":"}
ECDF_COLUMNS = 4  # panels per row: a readable grid, however many workloads
FEW_WALKS = 20  # an ECDF line of fewer walks gets a marker per walk


def _kernel_method_legend(fig: Figure, palette: dict[str, Any], methods: Sequence[str]) -> None:
    """One legend for the figure: kernel colours, then timing-method line styles."""
    handles = [Line2D([], [], color=c, lw=2, label=f"kernel {k}") for k, c in palette.items()]
    handles += [
        Line2D([], [], color="0.3", ls=METHOD_STYLES.get(m, "--"), label=an.method_label(m))
        for m in methods
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))


def fig_latency_ecdf(ecdf: pd.DataFrame, palette: dict[str, Any]) -> Figure:
    """ECDF of rmap_walk_ksm walk times (µs, log x): one block of panels per trigger, one
    panel per workload (unattributed walks in their own panel), x shared within a trigger."""
    triggers = list(dict.fromkeys(ecdf["trigger"]))
    per = {t: list(dict.fromkeys(ecdf.loc[ecdf["trigger"] == t, "workload"])) for t in triggers}
    ncols = min(ECDF_COLUMNS, max(len(w) for w in per.values()))
    nrows = {t: math.ceil(len(w) / ncols) for t, w in per.items()}
    fig = Figure(figsize=(3.6 * ncols + 0.6, 2.9 * sum(nrows.values()) + 1.2), layout="constrained")
    subfigs = fig.subfigures(
        len(triggers), 1, height_ratios=[nrows[t] for t in triggers], squeeze=False
    )
    for sub, trigger in zip(subfigs.ravel(), triggers, strict=True):
        axes = sub.subplots(nrows[trigger], ncols, sharex=True, sharey=True, squeeze=False)
        for ax, workload in zip(axes.ravel(), per[trigger], strict=False):
            d = ecdf[(ecdf["trigger"] == trigger) & (ecdf["workload"] == workload)]
            counts = []
            for (kernel, method), g in d.groupby(["kernel", "method"], sort=False):
                n = int(g["n_walks"].iloc[0])
                ax.step(
                    g["duration_us"],
                    g["fraction"],
                    where="post",
                    color=palette.get(str(kernel), "C0"),
                    ls=METHOD_STYLES.get(str(method), "--"),
                    lw=1.5,
                    # a handful of walks draws a line too short to see: mark each walk
                    marker="o" if n < FEW_WALKS else None,
                    ms=4,
                )
                counts.append(f"{kernel}: n={n:,}")
            ax.text(0.98, 0.04, "\n".join(counts), transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=7)  # fmt: skip
            ax.set_xscale("log")
            ax.set(
                title=_wrap(str(workload)),
                xlabel="walk (µs, log scale)",
                ylabel="fraction ≤ (0-1)",
                ylim=(0, 1.01),
            )
        for ax in axes.ravel()[len(per[trigger]) :]:
            ax.set_visible(False)
        sub.suptitle(f"trigger: {trigger}", fontsize=11, fontweight="bold")
    _kernel_method_legend(fig, palette, list(dict.fromkeys(ecdf["method"])))
    fig.suptitle("rmap_walk_ksm walk time, ECDF per trigger and workload")
    return fig


def _wrap(text: str, width: int = 34) -> str:
    """A panel title in lines of at most about `width` characters, broken after the
    commas of a workload label (a part longer than width gets a line of its own)."""
    lines: list[str] = []
    for part in text.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return ",\n".join(lines)


def _exact(points: pd.DataFrame) -> pd.DataFrame:
    """Exact timing methods only, when there are any (proxies under-read the walk)."""
    exact = points[points["method"] != "tracepoint-proxy"]
    return exact if len(exact) else points


def _draw_fit(ax: Axes, fit: pd.Series, x: str, color: Any) -> str:
    """The linear fit y = a + b x, drawn on log-log axes over the fitted x range; returns
    the slope in words for the panel's note."""
    _held, _words, per = walkcost.AXES[x]
    xs = np.geomspace(fit["x_min"], fit["x_max"], 60)
    y = fit["intercept_us"] + fit["slope_us"] * xs
    # A negative intercept would send the line to -inf on log axes near x = 1: draw it
    # where it stays within a factor 2 of the smallest point it was fitted to.
    keep = y >= min(fit["y_at_x_min_us"], fit["y_at_x_max_us"]) / 2
    ax.plot(xs[keep], y[keep], color=color, ls="--", lw=1)
    unit = "1,000 VMAs" if x == "vmas" else "mapping"
    slope = tx.fmt_value(fit["slope_us"] * per)
    return f"{fit['kernel']}: {'+' if fit['slope_us'] >= 0 else ''}{slope} µs/{unit}"


HELD_MARKERS = ("o", "s", "D", "v", "P", "X")


def fig_walk_cost(wc: WalkCost, palette: dict[str, Any]) -> Figure:
    """The walk-cost model: p50 (dots) and p99 (triangles) walk time against the walked
    workload's VMAs and against mappings per KSM page, per trigger, log-log, with the
    linear least-squares fit of p50 (dashed) where one was made."""
    points, fits = _exact(wc.points), _exact(wc.fits)
    triggers = list(dict.fromkeys(points["trigger"]))
    fig, axes = _new_figure(2, len(triggers), height=3.4)
    axes = axes.reshape(len(triggers), 2)
    for row, trigger in zip(axes, triggers, strict=True):
        for ax, x in zip(row, ("vmas", "mappings"), strict=True):
            _walk_cost_panel(ax, points, fits, trigger, x, palette)
    handles = [Line2D([], [], color=c, lw=2, label=f"kernel {k}") for k, c in palette.items()]
    handles += [
        Line2D([], [], ls="none", marker="o", color="0.35", label="p50 (filled)"),
        Line2D([], [], ls="none", marker="o", mfc="none", color="0.35", label="p99 (hollow)"),
        Line2D([], [], ls="--", color="0.35", label="linear least-squares fit of p50"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    fig.suptitle("rmap_walk_ksm walk cost: walk time against VMAs and mappings per KSM page")
    return fig


def _walk_cost_panel(
    ax: Axes,
    points: pd.DataFrame,
    fits: pd.DataFrame,
    trigger: str,
    x: str,
    palette: dict[str, Any],
) -> None:
    """One panel: points by kernel (colour), statistic (p50 filled, p99 hollow) and level
    of the other count (marker, the panel's legend); the p50 fits, their slopes noted."""
    held, words, _per = walkcost.AXES[x]
    p = points[(points["trigger"] == trigger) & points[x].notna()]
    levels = sorted({int(v) for v in p[held].dropna()})
    marker = {lv: HELD_MARKERS[i % len(HELD_MARKERS)] for i, lv in enumerate(levels)}
    held_unit = "mappings/page" if held == "mappings" else "VMAs"
    level_of = p[held].astype("Float64").fillna(-1)
    for (kernel, stat, level), g in p.groupby(["kernel", "statistic", level_of], sort=False):
        color = palette.get(str(kernel), "C0")
        ax.plot(
            g[x].astype(float),
            g["value_us"],
            ls="none",
            marker=marker.get(int(level), "o"),
            mfc=color if stat == "p50" else "none",
            color=color,
        )
    f = fits[(fits["trigger"] == trigger) & (fits["x"] == x) & (fits["statistic"] == "p50")]
    fitted = f[f["note"].fillna("") == ""]
    notes = [
        _draw_fit(ax, fit, x, palette.get(str(fit["kernel"]), "C0")) for _, fit in fitted.iterrows()
    ]
    note = (
        "linear fit of p50:\n" + "\n".join(notes)
        if notes
        else f"not fitted: fewer than 2 distinct {words}"
    )
    ax.text(
        0.98,
        0.97,
        note,
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=7,
        color="0.25",
        bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
    )
    handles = [
        Line2D(
            [],
            [],
            ls="none",
            marker=m,
            color="0.35",
            label=f"{lv:,} {'VMA' if (lv, held) == (1, 'vmas') else held_unit}",
        )
        for lv, m in marker.items()
    ]
    ax.set(
        xscale="log",
        yscale="log",
        title=f"{trigger}: against {words}",
        xlabel=f"{words} (count, log scale)",
        ylabel="walk (µs, log scale)",
    )
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1000)  # headroom for the legend and the note above the points
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=7, title="at", title_fontsize=7)


def fig_density(cap: CapacityResult, palette: dict[str, Any]) -> Figure:
    """Host RAM used (GiB) against guests, without KSM and with it (median and 95% band)."""
    fig, axes = _new_figure(1, height=4.8)
    ax = axes[0]
    curve = cap.curve
    for g, grp in curve.groupby("guest_memory_mib"):
        first = grp[grp["kernel"] == grp["kernel"].iloc[0]]
        ax.plot(
            first["guests"],
            first["used_gib_without_ksm"],
            color="0.2",
            ls="--",
            label=f"without KSM ({g:g} MiB guests)",
        )
    settings = cap.settings
    colors = setting_palette(settings, palette)
    keys = ["kernel", "guest_memory_mib", "ksm_setting"]
    for (kernel, g, setting), grp in curve.groupby(keys, sort=False):
        color = colors.get((str(kernel), str(setting)), palette.get(str(kernel), "C0"))
        what = f"kernel {kernel}" + (f", {setting}" if setting else "")
        ax.plot(
            grp["guests"],
            grp["used_gib_with_ksm"],
            color=color,
            label=f"with KSM, {what} ({g:g} MiB guests)",
        )
        ax.fill_between(
            grp["guests"],
            grp["used_gib_with_ksm_lo"],
            grp["used_gib_with_ksm_hi"],
            color=color,
            alpha=0.25,
            lw=0,
            label=f"95% interval, {what}",
        )
    if cap.host_ram_gib is not None:
        ax.axhline(
            cap.host_ram_gib, color="0.5", lw=1, label=f"host RAM ({cap.host_ram_gib:g} GiB)"
        )
        ax.axhline(
            cap.host_ram_gib - cap.reserve_gib,
            color="0.5",
            lw=1,
            ls=":",
            label=f"host RAM - reserve ({cap.reserve_gib:g} GiB)",
        )
    ax.set(
        xlabel="guests on the host (count)",
        ylabel="host RAM used (GiB)",
        title="measured savings projected to a full host",
        xlim=(0, None),
        ylim=(0, None),
    )
    ax.legend(loc="upper left")
    fig.suptitle("Density: guests against host RAM")
    return fig


def setting_palette(settings: Sequence[str], palette: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(kernel, KSM setting) -> colour: the kernel's colour when nothing is swept, else
    one colour per setting (the same for every kernel; kernels differ by marker)."""
    if len(settings) <= 1:
        return {(k, s): c for k, c in palette.items() for s in settings}
    shades = sns.color_palette("viridis", len(settings))
    return {(k, s): shades[i] for k in palette for i, s in enumerate(settings)}


def fig_ksm_tradeoff(cap: CapacityResult, palette: dict[str, Any]) -> Figure:
    """Saving per guest (MiB) against ksmd CPU (% of one core), one point per KSM setting
    and kernel, with 95% bootstrap intervals of both means; the CPU budget as a line,
    settings over the budget hollow, the best one ringed."""
    fig, axes = _new_figure(1, height=4.8)
    ax = axes[0]
    t = cap.table
    markers = dict(zip(palette, "osD^v<>", strict=False))
    for r in t.itertuples(index=False):
        x, y = float(r.ksmd_cpu_pct), float(r.saving_per_guest_mib)
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        color = palette.get(str(r.kernel), "C0")
        err_x = [[max(x - float(r.ksmd_cpu_pct_lo), 0)], [max(float(r.ksmd_cpu_pct_hi) - x, 0)]]
        err_y = [
            [max(y - float(r.saving_per_guest_mib_lo), 0)],
            [max(float(r.saving_per_guest_mib_hi) - y, 0)],
        ]
        ax.errorbar(x, y, xerr=err_x, yerr=err_y, color=color, capsize=3, lw=1, zorder=2)
        ax.scatter(
            [x],
            [y],
            s=70,
            marker=markers.get(str(r.kernel), "o"),
            facecolors=color if r.within_budget else "white",
            edgecolors=color,
            linewidths=1.5,
            zorder=3,
        )
        if r.best:
            ax.scatter([x], [y], s=260, facecolors="none", edgecolors="0.1", lw=1.2, zorder=4)
        label = (r.ksm_setting or "as in the spec") + ("" if r.within_budget else " (over)")
        if math.isfinite(float(r.settle_s_max)):  # the other side of the trade-off
            label += f"\nsettled in {float(r.settle_s_max):.0f} s"
        ax.annotate(label, (x, y), xytext=(6, 6), textcoords="offset points", fontsize=8)
    budget = cap.budget.ksmd_cpu_max_pct
    if budget is not None:
        ax.axvline(budget, color="C3", ls="--", lw=1, label=f"ksmd CPU budget ({budget:g}%)")
    handles = [
        Line2D([], [], ls="", marker=markers.get(k, "o"), color=c, label=f"kernel {k}")
        for k, c in palette.items()
        if k in set(t["kernel"].astype(str))
    ]
    handles += [
        Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", label="over the budget"),
        Line2D([], [], ls="", marker="o", ms=13, mfc="none", mec="0.1", label="best within it"),
    ]
    if budget is not None:
        handles.append(Line2D([], [], color="C3", ls="--", label=f"ksmd CPU budget ({budget:g}%)"))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set(
        xlabel="ksmd CPU over merge and hold (% of one core)",
        ylabel="saved per guest, general_profit (MiB)",
        title="one point per KSM setting; bars: 95% intervals over trials",
    )
    # room above and to the right of the points for their labels
    ys = t["saving_per_guest_mib_hi"].astype(float).replace([np.inf, -np.inf], np.nan)
    xs = t["ksmd_cpu_pct_hi"].astype(float).replace([np.inf, -np.inf], np.nan)
    top = float(np.nanmax([ys.max(), 1.0]))
    right = float(np.nanmax([xs.max(), budget or 0.0, 1.0]))
    ax.set_ylim(0, top * 1.15)
    ax.set_xlim(0, right * 1.4)
    fig.suptitle("KSM trade-off: memory saved against ksmd CPU")
    return fig


def build_figures(a: an.Analysis) -> dict[str, Figure]:
    """Every figure the data allows, by file stem. A figure whose data was not recorded is
    absent (the page says so)."""
    palette = kernel_palette(a.kernels)
    builders: list[tuple[str, Callable[[], Figure], bool]] = [
        (
            "ksm_timeline",
            lambda: fig_ksm_timeline(a.timeline, palette),
            a.timeline is not None and not a.timeline.empty,
        ),
        (
            "merge_rate",
            lambda: fig_merge_rate(a.trials, palette),
            a.trials["merge_rate_90_pages_per_s"].notna().any(),
        ),
        ("ksmd_cpu", lambda: fig_ksmd_cpu(a.trials, palette), a.trials["ksmd_cpu_s"].notna().any()),
    ]
    if a.latency is not None:
        lat = a.latency
        builders.append(("latency_ecdf", lambda: fig_latency_ecdf(lat.ecdf, palette), True))
        if lat.walk_cost is not None:
            wc = lat.walk_cost
            builders.append(("walk_cost", lambda: fig_walk_cost(wc, palette), True))
    if a.capacity is not None:
        builders.append(("density", lambda: fig_density(a.capacity, palette), True))
        swept = len(a.capacity.settings) > 1
        builders.append(("ksm_tradeoff", lambda: fig_ksm_tradeoff(a.capacity, palette), swept))
    with figure_style():
        return {name: build() for name, build, ok in builders if ok}


# --------------------------------------------------------------------------- display tables


@dataclass(frozen=True)
class TableView:
    """A formatted table for the templates: header, rows of strings, and its CSV file."""

    columns: list[str]
    rows: list[list[str]]
    csv: str | None = None

    @property
    def markdown(self) -> str:
        return tx.markdown_table(pd.DataFrame(self.rows, columns=self.columns))


def view(df: pd.DataFrame, csv: str | None = None) -> TableView:
    """Format every cell of df (see analysis.fmt_value) for the templates."""
    rows = [[tx.fmt_value(v, str(c)) for c, v in r.items()] for _, r in df.iterrows()]
    return TableView([str(c) for c in df.columns], rows, csv)


def runs_display(manifests: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: what ran, where, with which software, and how its trials ended."""
    rows = []
    for m in manifests:
        host = m.get("host") or {}
        statuses = pd.Series([t.get("status") for t in m.get("trials") or []]).value_counts()
        rows.append(
            {
                "run": m.get("run_id"),
                "spec": m.get("spec_name"),
                "spec sha256": str(m.get("spec_sha256") or "")[:12],
                "densitylab": m.get("densitylab_version"),
                "git commit": m.get("git_commit"),
                "host kernel": m.get("kernel_release") or host.get("kernel_release"),
                "accel": m.get("accel") or host.get("accel"),
                "QEMU": m.get("qemu_version"),
                "libvirt": m.get("libvirt_version"),
                "seed": m.get("seed"),
                "started": m.get("started_at"),
                "ended": m.get("ended_at"),
                "trials": ", ".join(f"{n} {s}" for s, n in statuses.items()) or "none",
            }
        )
    return pd.DataFrame(rows)


def kernels_display(manifests: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The kernels under test as the manifests describe them (empty if none listed)."""
    rows = [
        {
            "kernel": k.get("name"),
            "release": k.get("release"),
            "origin": k.get("origin"),
            "config sha256": str(k.get("config_sha256") or "")[:12] or None,
        }
        for m in manifests
        for k in m.get("kernels") or []
    ]
    return pd.DataFrame(rows).drop_duplicates() if rows else pd.DataFrame()


def status_display(tm: pd.DataFrame) -> pd.DataFrame:
    """Trials per kernel and fleet size, by status."""
    counts = tm.groupby(["kernel", "fleet_size", "status"]).size().unstack(fill_value=0)
    return counts.reset_index().rename(columns={"fleet_size": "fleet size (guests)"})


def failed_display(tm: pd.DataFrame) -> pd.DataFrame:
    """The trials that did not succeed, with the reason the runner recorded."""
    bad = tm[tm["status"] != "successful"]
    return bad[["trial_id", "kernel", "fleet_size", "repeat", "status", "reason"]].rename(
        columns={"trial_id": "trial", "fleet_size": "fleet size (guests)"}
    )


def repeats_display(rep: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Across repeats: mean with its t interval and CV (%), metric labels with units."""
    if metrics is not None:
        rep = rep[rep["metric"].isin(metrics)]
    return pd.DataFrame(
        {
            "metric": rep["metric"].map(an.TRIAL_METRICS),
            "kernel": rep["kernel"],
            "fleet size (guests)": rep["fleet_size"],
            **({"KSM setting": rep["ksm_setting"]} if "ksm_setting" in rep else {}),
            "n": rep["n"],
            "mean [95% CI]": [
                tx.fmt_interval(*r) for r in rep[["mean", "ci_lo", "ci_hi"]].itertuples(index=False)
            ],
            "CV (%)": (rep["cv"] * 100).map(tx.fmt_value),
        }
    )


def comparisons_display(cmp: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Kernel comparisons of per-trial metrics in words and intervals (a / reference b)."""
    if cmp.empty:
        return cmp
    if metrics is not None:
        cmp = cmp[cmp["metric"].isin(metrics)]
    keys = pd.DataFrame(
        {
            "metric": cmp["metric"].map(an.TRIAL_METRICS),
            "fleet size (guests)": cmp["fleet_size"],
            "a vs b (reference)": cmp["kernel_a"] + " vs " + cmp["kernel_b"],
        }
    )
    return pd.concat([keys, tx.comparison_display(cmp)], axis=1)


def _latency_cell(row: pd.Series) -> str:
    text = tx.fmt_interval(row["value_us"], row["lo_us"], row["hi_us"])
    return f"≥ {text}" if row["lower_bound"] else text


def latency_display(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per kernel, trigger and method; values in µs, '≥' for lower-bound methods."""
    s = summary.assign(cell=summary.apply(_latency_cell, axis=1))
    keys = ["kernel", "trigger", "workload", "method", "method_label", "n"]
    wide = s.pivot_table(
        index=keys, columns="statistic", values="cell", aggfunc="first", sort=False
    )
    wide = wide[[c for c in [*an.LATENCY_QUANTILES, "max"] if c in wide.columns]]
    notes = s[s["note"].str.startswith("only")].groupby(keys, sort=False)["note"].agg("; ".join)
    wide = wide.join(notes.rename("notes")).reset_index()
    wide["method"] = wide["method"] + " (" + wide.pop("method_label") + ")"
    return wide.rename(
        columns={c: f"{c} (µs) [95% CI]" for c in an.LATENCY_QUANTILES} | {"max": "max (µs)"}
    ).fillna("")


def latency_cmp_display(cmp: pd.DataFrame) -> pd.DataFrame:
    """Latency comparisons per trigger, workload and timing method (a / reference b); the
    trial-level table also says the smallest p its trial counts can reach."""
    if cmp.empty:
        return cmp
    keys = pd.DataFrame(
        {
            "trigger": cmp["trigger"],
            "workload": cmp["workload"],
            "method": cmp["method_label"],
            "a vs b (reference)": cmp["kernel_a"] + " vs " + cmp["kernel_b"],
        }
    )
    out = pd.concat([keys, tx.comparison_display(cmp)], axis=1)
    if "min_attainable_p" in cmp:
        # Holm multiplies the smallest p by the number of rows: with too few trials no
        # difference can be called, and "no clear difference" would misread that.
        reachable = (cmp["min_attainable_p"] * len(cmp)).clip(upper=1.0)
        out["smallest p reachable (Holm)"] = reachable.map(lambda p: tx.fmt_value(p, "p"))
        short = (reachable >= an.ALPHA) & cmp["p_value"].notna()
        need = an.trial_repeats_needed(len(cmp))
        out.loc[short, "verdict"] = f"cannot be called: needs ≥ {need} trials a side"
    return out


def walk_cost_display(fits: pd.DataFrame) -> pd.DataFrame:
    """The walk-cost fits: slope per 1,000 VMAs (or per mapping), R², exponent, shape."""
    per = fits["x"].map({x: a[2] for x, a in walkcost.AXES.items()})
    held = [
        "any" if pd.isna(h) else f"{int(h):,} {'mappings/page' if x == 'vmas' else 'VMAs'}"
        for h, x in zip(fits["held"], fits["x"], strict=True)
    ]
    return pd.DataFrame(
        {
            "kernel": fits["kernel"],
            "trigger": fits["trigger"],
            "method": fits["method"].map(an.method_label),
            "statistic": fits["statistic"],
            "against": fits["x"].map({x: a[1] for x, a in walkcost.AXES.items()}),
            "at": held,
            "points": fits["n_points"],
            "slope (µs per 1,000 VMAs or per mapping)": fits.get("slope_us", np.nan) * per,
            "linear R²": fits.get("linear_r2", np.nan),
            "log-log exponent": fits.get("exponent", np.nan),
            "log-log R²": fits.get("loglog_r2", np.nan),
            "shape": fits.get("shape", pd.Series("", index=fits.index)).fillna(""),
            "note": fits["note"].fillna(""),
        }
    )


def phase_display(ps: pd.DataFrame) -> pd.DataFrame:
    """Median per-trial delta by phase (columns) for the key counters."""
    d = ps[ps["counter"].isin(KEY_COUNTERS)]
    if d.empty:
        return d
    wide = d.pivot_table(
        index=["counter", "kernel", "fleet_size"], columns="phase", values="median", sort=False
    )
    wide = wide[[p for p in an.PHASES if p in wide.columns]].reset_index()
    return wide.rename(columns={"fleet_size": "fleet size (guests)"})


def capacity_display(cap: CapacityResult) -> pd.DataFrame:
    """Guests per host with and without KSM, and the saving they rest on, with intervals."""
    t = cap.table
    out = pd.DataFrame(
        {
            "kernel": t["kernel"],
            "guest size (MiB)": t["guest_memory_mib"],
            "fleet sizes measured": t["fleet_sizes"],
            "trials": t["trials"],
            "saving per added guest (MiB) [95% CI]": [
                tx.fmt_interval(*r)
                for r in t[
                    [
                        "saving_per_added_guest_mib",
                        "saving_per_added_guest_mib_lo",
                        "saving_per_added_guest_mib_hi",
                    ]
                ].itertuples(index=False)
            ],
        }
    )
    if "guests_without_ksm" in t:
        out["guests/host without KSM"] = t["guests_without_ksm"]
        out["guests/host with KSM [95% CI]"] = [
            tx.fmt_interval(*r)
            for r in t[["guests_with_ksm", "guests_with_ksm_lo", "guests_with_ksm_hi"]].itertuples(
                index=False
            )
        ]
    if any(t["ksm_setting"].astype(str) != "") or cap.budget.limits:
        out.insert(0, "KSM setting", t["ksm_setting"].replace("", "as in the spec"))
        cols = {
            "saved per guest (MiB) [95% CI]": "saving_per_guest_mib",
            "ksmd CPU (% of a core) [95% CI]": "ksmd_cpu_pct",
        }
        for label, col in cols.items():
            out[label] = [
                tx.fmt_interval(*r)
                for r in t[[col, f"{col}_lo", f"{col}_hi"]].itertuples(index=False)
            ]
        out["slowest settle (s)"] = t["settle_s_max"].map(tx.fmt_value)
        out["budget"] = [
            ("best" if b else "within") if ok else f"over: {why}"
            for ok, b, why in zip(t["within_budget"], t["best"], t["over_budget"], strict=True)
        ]
    out["note"] = t["note"]
    return out


# --------------------------------------------------------------------------- writing

FIG_CAPTIONS = {
    "ksm_timeline": "KSM savings over time per kernel and fleet size: median over trials, "
    "band from the smallest to the largest trial.",
    "merge_rate": "Merge rate: pages merged per second from merge start until pages_sharing "
    "first reached 50% and 90% of its final value.",
    "ksmd_cpu": "CPU time consumed by ksmd per trial and per GiB saved.",
    "latency_ecdf": "Distribution of rmap_walk_ksm walk times (ECDF, log x), one panel per "
    "trigger and workload, unattributed walks in their own panel; dotted "
    "'lower-bound proxy' lines under-read the walk.",
    "walk_cost": "The walk-cost model: p50 (dots) and p99 (triangles) per workload row "
    "against the walked workload's own VMA count and mappings per KSM page, log-log; dashed: "
    "the linear least-squares fit of p50 (see the fits table for slope, R² and points).",
    "density": "Host RAM used by N guests without KSM and with the measured savings "
    "(95% bootstrap band), per KSM setting when a knob was swept; see the capacity model below.",
    "ksm_tradeoff": "One point per KSM setting (a swept `ksm:` knob) and kernel. Saving per "
    "guest: general_profit at the end of the hold (already net of KSM's metadata) divided by "
    "the fleet size, mean over the setting's successful trials. ksmd CPU: the ksmd thread's "
    "utime + stime (/proc/PID/stat) from the first to the last sample of the merge and hold "
    "phases, per second of wall time, in % of one core, mean over trials. Bars: 95% "
    "bootstrap intervals of both means over trials. Hollow: the setting breaks the budget "
    "(ksmd CPU or time to settle); ringed: the best setting within it; each label gives "
    "the setting's slowest time to settle.",
}


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside path, renamed over path if it succeeds."""
    with atomic_path(path) as tmp:
        write(tmp)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False)


def _write_text(text: str, path: Path) -> None:
    path.write_text(text, encoding="utf-8")


FIGURE_FORMATS = ("png", "pdf", "svg")


def _savefig(fig: Figure, fmt: str, path: Path) -> None:
    fig.savefig(path, format=fmt, dpi=FIG_DPI, metadata=FIGURE_METADATA[fmt])


# No software stamp or date in any format, and fixed SVG ids: the same runs give the same
# bytes in every format.
FIGURE_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}


def _save_figure(fig: Figure, png: Path) -> tuple[dict[str, Any], list[Path]]:
    """Save fig as PNG (for the page), PDF and SVG (for a paper) beside each other."""
    paths = []
    with mpl.rc_context({"svg.hashsalt": "densitylab", "pdf.compression": 6}):
        for fmt in FIGURE_FORMATS:
            path = png.with_suffix(f".{fmt}")
            _write_atomic(path, partial(_savefig, fig, fmt))
            paths.append(path)
            # The layout is settled by the first save; the vector formats reuse it rather
            # than solving the constrained layout twice more (most of a figure's cost).
            fig.set_layout_engine("none")
    width, height = (fig.get_size_inches() * FIG_DPI).round().astype(int)
    info = {
        "src": png.name,
        "width": int(width),
        "height": int(height),
        "title": fig.get_suptitle(),
        "caption": FIG_CAPTIONS.get(png.stem, ""),
        "formats": [p.name for p in paths],
    }
    return info, paths


# --------------------------------------------------------------------------- LaTeX

LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "µ": r"\textmu{}",
    "δ": r"$\delta$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "→": r"$\rightarrow$",
    "×": r"$\times$",
    "±": r"$\pm$",
    "∞": r"$\infty$",
    "²": r"\textsuperscript{2}",
    "–": "--",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX tabular cell (pdflatex with textcomp: µ, δ, ≥, → and the like
    become commands; every special character is escaped)."""
    return _LATEX_RE.sub(lambda m: LATEX_SPECIAL[m.group(0)], text)


def _numeric(cells: Sequence[str]) -> bool:
    return all(re.fullmatch(r"[-–+]?[\d,.]+(e[-+]?\d+)?|–|", c) for c in cells)


def latex_tabular(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A LaTeX tabular of formatted cells: numeric columns right-aligned, \\hline rules
    (no package beyond textcomp), every cell escaped."""
    align = "".join(
        "r" if _numeric([r[i] for r in rows]) and rows else "l" for i in range(len(columns))
    )
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\hline"]
    lines.append(" & ".join(latex_escape(str(c)) for c in columns) + r" \\")
    lines.append("\\hline")
    lines += [" & ".join(latex_escape(str(c)) for c in r) + r" \\" for r in rows]
    lines += ["\\hline", "\\end{tabular}", ""]
    return "\n".join(lines)


def _write_latex(df: pd.DataFrame, path: Path) -> None:
    v = view(df)
    path.write_text(latex_tabular(v.columns, v.rows), encoding="utf-8")


def _csv_tables(a: an.Analysis) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame | None] = {
        "trials": a.trials,
        "repeats": a.repeats,
        "kernel_comparisons": a.comparisons,
        "phase_deltas": a.phase_deltas,
        "phase_summary": a.phase_summary,
        "guests": a.guests,
        "ksm_timeline": a.timeline,
    }
    if a.latency is not None:
        tables |= {
            "latency_summary": a.latency.summary,
            "latency_comparisons": a.latency.comparisons,
            "latency_trial_comparisons": a.latency.trial_comparisons,
            "latency_ecdf": a.latency.ecdf,
            "latency_by_vmas": a.latency.by_vmas,
            "latency_workloads": a.latency.workloads.reset_index(),
        }
        if a.latency.walk_cost is not None:
            tables |= {
                "walk_cost_fits": a.latency.walk_cost.fits,
                "walk_cost_points": a.latency.walk_cost.points,
            }
    if a.published is not None:
        tables["published_comparison"] = a.published
    if a.savings is not None:
        tables["savings"] = a.savings
    if a.capacity is not None:
        tables |= {"capacity": a.capacity.table, "density_curve": a.capacity.curve}
    return {k: v for k, v in tables.items() if v is not None}


def _opt(df: pd.DataFrame | None, csv: str | None = None) -> TableView | None:
    return None if df is None or df.empty else view(df, csv)


def _latency_context(a: an.Analysis) -> dict[str, Any] | None:
    lat = a.latency
    if lat is None:
        return None
    return {
        "n": f"{lat.n_samples:,}",
        "has_proxy": bool(lat.summary["lower_bound"].any()),
        "summary": view(latency_display(lat.summary), "latency_summary.csv"),
        "comparisons": _opt(latency_cmp_display(lat.comparisons), "latency_comparisons.csv"),
        "trial_comparisons": _opt(
            latency_cmp_display(lat.trial_comparisons), "latency_trial_comparisons.csv"
        ),
        "trial_note": _trial_note(lat.trial_comparisons),
        "walk_cost": None if lat.walk_cost is None else _walk_cost_context(lat.walk_cost),
        "published": _published_context(a),
    }


def _trial_note(cmp: pd.DataFrame) -> str:
    """How many trials the trial-level table needs, in words."""
    rows = len(cmp)
    need = an.trial_repeats_needed(rows)
    if cmp.empty:
        return (
            "No trial-level comparison: it needs at least 2 successful trials per kernel "
            f"and row (and {need} to be able to call a difference)."
        )
    n_min = int(min(cmp["n_a"].min(), cmp["n_b"].min()))
    return (
        f"Each trial's median walk is one unit; the fewest trials on a side is {n_min}. "
        f"Over these {rows} rows (Holm-adjusted) a difference can be called only with "
        f"≥ {need} trials per kernel and row: the exact Mann-Whitney p cannot fall below "
        "2 / C(n_a + n_b, n_a)."
    )


def _walk_cost_context(wc: WalkCost) -> dict[str, Any]:
    return {
        "sentences": wc.sentences,
        "fits": view(walk_cost_display(wc.fits), "walk_cost_fits.csv"),
        "notes": walkcost.FIT_NOTES,
    }


def _published_context(a: an.Analysis) -> dict[str, Any] | None:
    if a.published is None:
        return None
    pub = walkcost.PUBLISHED
    return {
        "table": view(a.published, "published_comparison.csv"),
        "text": (
            f"The series' own benchmark reports a maximum walk of ~{pub['before_max_ms']:g} ms "
            f"before the change and ~{pub['after_max_ms']:g} ms after, with "
            f"~{pub['vmas']:,} VMAs, on {pub['where']} (first row). TCG emulation inflates "
            "absolute times, so compare the ratio before/after, which is what transfers; "
            "the absolute milliseconds do not."
        ),
    }


def _capacity_context(a: an.Analysis) -> dict[str, Any] | None:
    cap = a.capacity
    if cap is None:
        return None if a.capacity_note is None else {"not_applicable": a.capacity_note, "best": []}
    return {
        "not_applicable": None,
        "left_out": a.capacity_note,
        "table": view(capacity_display(cap), "capacity.csv"),
        "notes": cap.notes,
        "host_ram_gib": cap.host_ram_gib,
        "reserve_gib": cap.reserve_gib,
        "budget": cap.budget.describe() if cap.budget.limits else None,
        "best": best_lines(cap),
    }


def _context(
    a: an.Analysis, figures: dict[str, dict[str, Any]], tables: dict[str, Path]
) -> dict[str, Any]:
    multi = len(a.manifests) > 1
    run_ids = [str(m.get("run_id")) for m in a.manifests]
    ps = a.phase_summary
    return {
        "title": f"densitylab report: {', '.join(run_ids)}",
        "run_ids": run_ids,
        "spec_names": sorted({str(m.get("spec_name")) for m in a.manifests}),
        "missing": "not recorded in these runs" if multi else MISSING,
        "runs": view(runs_display(a.manifests)),
        "kernels": _opt(kernels_display(a.manifests)),
        "reference": a.kernels[0] if a.kernels else None,
        "warnings": a.warnings,
        "status": view(status_display(a.trials)),
        "failed": _opt(failed_display(a.trials)),
        "trials": view(
            a.trials[["trial_id", "kernel", "fleet_size", "repeat", "status", *an.TRIAL_METRICS]],
            "trials.csv",
        ),
        "ksm_recorded": a.timeline is not None,
        "figures": figures,
        "repeats": _opt(repeats_display(a.repeats), "repeats.csv"),
        "headline_repeats": _opt(repeats_display(a.repeats, HEADLINE_METRICS)),
        "comparisons": _opt(comparisons_display(a.comparisons), "kernel_comparisons.csv"),
        "headline_comparisons": _opt(comparisons_display(a.comparisons, HEADLINE_METRICS)),
        "phases": None if ps is None else _opt(phase_display(ps), "phase_summary.csv"),
        "guests": _opt(a.guests, "guests.csv"),
        "savings": _opt(a.savings, "savings.csv"),
        "latency": _latency_context(a),
        "capacity": _capacity_context(a),
        "methods": (*an.METHOD_NOTES, *walkcost.FIT_NOTES),
        "model_notes": MODEL_NOTES,
        "csv_files": sorted(p.name for p in tables.values()),
    }


def _display_views(ctx: Any) -> Iterator[tuple[str, TableView]]:
    """(file stem, view) of every formatted table the report shows that has a CSV twin:
    the table as it reads in the report, for a paper ("<csv stem>_display")."""
    if isinstance(ctx, TableView):
        if ctx.csv:
            yield ctx.csv.removesuffix(".csv") + "_display", ctx
    elif isinstance(ctx, dict):
        for v in ctx.values():
            yield from _display_views(v)


def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def write_report(
    run_dirs: Sequence[Path],
    out_dir: Path,
    *,
    host_ram_gib: float | None = None,
    reserve_gib: float = 2.0,
    budget: Budget | None = None,
) -> ReportPaths:
    """Analyse the run directories together and write out_dir/index.html, its figures
    (PNG), out_dir/summary.md and every table as CSV. host_ram_gib None: taken from the
    manifests' host facts when present; reserve_gib is kept free on the host (GiB);
    budget: what replaces the spec's `capacity:` limits (fields left None keep them).

    Raises UsageError when no run is given or a directory is not a readable run.
    """
    if not run_dirs:
        raise UsageError("no run directories given to the report")
    runs = [an.load_run(Path(d)) for d in run_dirs]
    a = an.analyze(runs, host_ram_gib=host_ram_gib, reserve_gib=reserve_gib, budget=budget)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, Path] = {}
    latex: dict[str, Path] = {}
    for name, df in _csv_tables(a).items():
        tables[name] = out_dir / f"{name}.csv"
        _write_atomic(tables[name], partial(_write_csv, df))
        latex[name] = out_dir / f"{name}.tex"
        _write_atomic(latex[name], partial(_write_latex, df))
    figures, fig_paths, fig_files = {}, {}, {}
    for name, fig in build_figures(a).items():
        log.info("figure %s", name)
        fig_paths[name] = out_dir / f"{name}.png"
        figures[name], fig_files[name] = _save_figure(fig, fig_paths[name])
    # Page integrity is read straight from the run directories (orchestrator.integrity).
    integ = integrity.report_table([Path(d) for d in run_dirs])
    if integ is not None:
        tables["integrity"] = out_dir / "integrity.csv"
        _write_atomic(tables["integrity"], partial(_write_csv, integ))
        latex["integrity"] = out_dir / "integrity.tex"
        _write_atomic(latex["integrity"], partial(_write_latex, integ))
    # So are the KSM correctness checks (orchestrator.checks), kernel x check.
    kchecks = checks.report_table([Path(d) for d in run_dirs])
    if kchecks is not None:
        tables["checks"] = out_dir / "checks.csv"
        _write_atomic(tables["checks"], partial(_write_csv, kchecks))
    ctx = _context(a, figures, tables)
    ctx["integrity"] = None if integ is None else view(integ, "integrity.csv")
    ctx["checks"] = None if kchecks is None else view(kchecks, "checks.csv")
    ctx["ab_pairs"], pair_warnings = abdiff.report_lines(a.manifests)
    ctx["warnings"] = [*ctx["warnings"], *pair_warnings]
    for stem, table in _display_views(ctx):
        latex[stem] = out_dir / f"{stem}.tex"
        text = latex_tabular(table.columns, table.rows)
        _write_atomic(latex[stem], partial(_write_text, text))
    env = _environment()
    index, summary = out_dir / "index.html", out_dir / "summary.md"
    for path, template in ((index, "report.html.j2"), (summary, "summary.md.j2")):
        text = env.get_template(template).render(**ctx)
        _write_atomic(path, partial(_write_text, text))
    log.info("report for %s written to %s", ", ".join(ctx["run_ids"]), out_dir)
    return ReportPaths(out_dir, index, summary, fig_paths, tables, fig_files, latex, a)


def write_campaign(
    run_dirs: Sequence[Path],
    out_dir: Path,
    *,
    host_ram_gib: float | None = None,
    reserve_gib: float = 2.0,
    budget: Budget | None = None,
) -> ReportPaths:
    """A report over a campaign (e.g. results/*): runs of one spec combined; with several
    specs, one report per spec in out_dir/<spec>-<hash>/ and out_dir/index.html and
    campaign.md setting the specs side by side (campaign_metrics.csv in long form).

    Raises UsageError when no run is given or a directory is not a readable run."""
    groups = campaign.group_runs([Path(d) for d in run_dirs])
    if len(groups) == 1:
        return write_report(
            run_dirs, out_dir, host_ram_gib=host_ram_gib, reserve_gib=reserve_gib, budget=budget
        )
    out_dir = Path(out_dir)
    done = []
    for i, g in enumerate(groups, 1):
        log.info("spec %d of %d: %s (%d runs)", i, len(groups), g.spec_name, len(g.runs))
        paths = write_report(
            g.runs,
            out_dir / g.slug,
            host_ram_gib=host_ram_gib,
            reserve_gib=reserve_gib,
            budget=budget,
        )
        done.append((g, paths.analysis))
    table = campaign.campaign_table(done)
    csv = out_dir / "campaign_metrics.csv"
    _write_atomic(csv, partial(_write_csv, table))
    wide = campaign.side_by_side(table)
    ctx = {
        "groups": [
            {"name": g.spec_name, "key": g.key, "slug": g.slug, "runs": [p.name for p in g.runs]}
            for g in groups
        ],
        "n_runs": sum(len(g.runs) for g in groups),
        "tables": [(title, tx.markdown_table(df)) for title, df in wide.items()],
        "html_tables": list(wide.items()),
    }
    env = _environment()
    index, summary = out_dir / "index.html", out_dir / "campaign.md"
    for path, template in ((index, "campaign.html.j2"), (summary, "campaign.md.j2")):
        text = env.get_template(template).render(**ctx)
        _write_atomic(path, partial(_write_text, text))
    log.info("campaign report (%d specs) written to %s", len(groups), out_dir)
    return ReportPaths(out_dir, index, summary, tables={"campaign_metrics": csv})
