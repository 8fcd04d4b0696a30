"""Progress and the end-of-run summary, drawn with rich (only on a terminal)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the report's progress must not import the engine (libvirt)
    from orchestrator.engine.state import TrialResult


class LogStatus(logging.Handler):
    """A long read (a report over a campaign) shown as one status line: the newest INFO
    message of the given loggers (run files read, passes over the walks, figures). Only
    on a terminal; elsewhere nothing changes. Warnings still reach the root handlers."""

    def __init__(self, console: Console, *loggers: str):
        super().__init__()
        self.console = console
        self.names = loggers
        self.status: Any = None
        self.saved: list[tuple[logging.Logger, int, bool]] = []

    def __enter__(self) -> LogStatus:
        if not self.console.is_terminal:
            return self
        self.status = self.console.status("reading runs")
        self.status.start()
        for name in self.names:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
            logger.propagate = False  # INFO goes to the status line; emit forwards the rest
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for logger, level, propagate in self.saved:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate
        self.saved.clear()
        if self.status is not None:
            self.status.stop()

    def emit(self, record: logging.LogRecord) -> None:
        if self.status is not None and record.levelno >= logging.INFO:
            self.status.update(record.getMessage())
        root = logging.getLogger()
        if record.levelno >= root.getEffectiveLevel():  # what the root would have shown
            root.handle(record)


class RichProgress:
    """One status line: trial, phase, guests' Ansible progress, KSM sharing vs target."""

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None
        self.trial = ""
        self.phase_name = ""
        self.detail = ""
        self.guest_states: dict[str, str] = {}

    def __enter__(self) -> RichProgress:
        if self.console.is_terminal:
            self.live = Live(
                self._render(), console=self.console, refresh_per_second=4, transient=True
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def _render(self) -> Text:
        return Text(f"{self.trial} {self.phase_name:<9} {self.detail}")

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def phase(self, trial_id: str, phase: str) -> None:
        if not self.console.is_terminal:
            self.console.print(f"{trial_id}: {phase}", markup=False, highlight=False)
        self.trial, self.phase_name, self.detail = trial_id, phase, ""
        self.guest_states.clear()
        self._refresh()

    def guest_event(self, guest: str, event: str) -> None:
        if event.startswith("runner_on_") or event == "runner_retry":
            self.guest_states[guest] = event.removeprefix("runner_on_")
            done = sum(1 for v in self.guest_states.values() if v == "ok")
            self.detail = f"ansible: {done}/{len(self.guest_states)} guests ok"
            self._refresh()

    def merge(self, sharing_mib: float, target_mib: float | None, full_scans: int) -> None:
        target = f" / predicted {target_mib:.0f} MiB" if target_mib is not None else ""
        self.detail = f"KSM saving {sharing_mib:.0f} MiB{target}, full scans {full_scans}"
        self._refresh()


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def summary_table(results: Sequence[TrialResult]) -> Table:
    t = Table(title="densitylab summary")
    cols = (
        "trial",
        "status",
        "guests",
        "pages sharing",
        "saved MiB (measured)",
        "saved MiB (predicted)",
        "error %",
        "general_profit MiB",
        "ksmd CPU-s",
        "settle s",
    )
    for c in cols:
        t.add_column(c, justify="left" if c in ("trial", "status") else "right")
    for r in results:
        err = None
        # The per-page count where it was measured (orchestrator.pagecount), else the
        # scramble's difference.
        saved = r.pagecount_saving_mib
        saved = r.measured_saving_mib if saved is None else saved
        if saved is not None and r.predicted_saving_mib:
            err = 100 * (saved - r.predicted_saving_mib) / r.predicted_saving_mib
        settle = fmt(r.settle_s) + ("" if r.settled else " (timeout)")
        t.add_row(
            r.trial_id,
            r.status,
            str(r.fleet_size),
            fmt(r.pages_sharing, "d") if r.pages_sharing is not None else "-",
            fmt(saved),
            fmt(r.predicted_saving_mib),
            fmt(err, "+.1f"),
            fmt(r.general_profit_mib),
            fmt(r.ksmd_cpu_s, ".2f"),
            settle,
        )
    return t


def latency_summary(run_dir: Path) -> Table | None:
    """rmap_walk_ksm latency per trial, trigger, method and workload walked, with that
    workload's VMAs and mappings per KSM page; unattributed walks in rows of their own."""
    path = run_dir / "latency.parquet"
    if not path.exists():
        return None
    lat = pd.read_parquet(path)
    if lat.empty:
        return None
    t = Table(title="rmap_walk_ksm latency (us)")
    cols = ("trial", "trigger", "method", "workload", "walks", "p50", "p99", "max", "VMAs", "maps")
    for c in cols:
        t.add_column(c, justify="left" if c in cols[:4] else "right")
    lat = lat[lat.trigger.isin(["migrate", "reclaim"])]
    if "target_kind" not in lat:  # runs from before per-workload attribution
        lat = lat.assign(target_kind="unattributed", mappings=pd.NA)
    lat = lat.assign(
        vmas_key=lat.vmas.fillna(-1).astype(int), maps_key=lat.mappings.fillna(-1).astype(int)
    )
    keys = ["trial_id", "trigger", "method", "lower_bound", "target_kind", "vmas_key", "maps_key"]
    for (trial, trigger, method, lower, kind, vmas, maps), g in lat.groupby(keys, sort=True):
        us = g.duration_ns / 1000
        label = f"{method} (lower bound)" if lower else method
        t.add_row(
            str(trial),
            str(trigger),
            label,
            str(kind),
            str(len(g)),
            f"{us.quantile(0.5):.1f}",
            f"{us.quantile(0.99):.1f}",
            f"{us.max():.1f}",
            "-" if vmas < 0 else str(vmas),
            "-" if maps < 0 else str(maps),
        )
    return t
