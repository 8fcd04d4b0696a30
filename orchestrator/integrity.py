"""Memory integrity: every workload page checked against what its pattern says it holds.

KSM's worst failure is not a slow walk but a wrong page: a merge, a migration or a
swap-in that hands a process someone else's content. dlfill knows what each page of its
region holds (dup, zero, unique, volatile by the generation last written, scrambled),
so on SIGUSR2 it reads every page back through its mapping (faulting swapped pages in)
and prints one line:

    DLFILL VERIFIED {"pages":N,"mismatches":M,"first":[idx,...],"seq":K,"verify_s":S}

This module is shared by every place a workload runs (guests through the workload
driver, host processes, processes inside a lab host): it parses that line, asks
processes for it, keeps a trial's checks as the `integrity` table, fails the trial
with the page indices on any mismatch, and summarises the table for the CLI and the
report. It touches nothing itself: callers pass how to signal and how to read output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.agent import procs as agent_procs
from orchestrator.agent.fs import AgentError
from orchestrator.errors import HostError, IntegrityError
from orchestrator.results import schema
from orchestrator.triggers import HostProcess

VERIFIED_PREFIX = agent_procs.VERIFIED_PREFIX
VERIFY_TIMEOUT_S = 900.0  # generous: a TCG guest verified 32 MiB in 0.06-0.4 s here
TABLE = schema.INTEGRITY.name
COLUMNS = schema.INTEGRITY.names


@dataclass(frozen=True)
class Verification:
    """One workload's answer to one verification request."""

    workload: str
    pages: int
    mismatches: int
    first: tuple[int, ...]  # the first mismatched page indices (dlfill names up to 16)
    seq: int  # dlfill's count of verifications, 1 for the first
    verify_s: float


def parse_verified(line: str, workload: str) -> Verification:
    """Parse one DLFILL VERIFIED line. Raises HostError naming the workload when the line
    is not one (a truncated read, another program's output)."""
    try:
        if not line.startswith(VERIFIED_PREFIX):
            raise ValueError("no DLFILL VERIFIED prefix")
        d = json.loads(line[len(VERIFIED_PREFIX) :])
        v = Verification(
            workload,
            int(d["pages"]),
            int(d["mismatches"]),
            tuple(int(i) for i in d["first"]),
            int(d["seq"]),
            float(d["verify_s"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise HostError(f"{workload}: unreadable verification line {line[:200]!r}: {e}") from e
    if v.mismatches < len(v.first) or v.mismatches > v.pages:
        raise HostError(f"{workload}: inconsistent verification line {line[:200]!r}")
    return v


def verified_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(VERIFIED_PREFIX)]


def verify_host_workload(
    procs: Sequence[HostProcess], timeout_s: float = VERIFY_TIMEOUT_S
) -> list[Verification]:
    """Verify the host dlfill copies (named host-dlfill-<i>, as in the samples): the
    agent's check, as lab hosts run it, with this process's children tested by poll."""
    by_pid = {p.pid: p for p in procs}
    named = {f"host-dlfill-{i}": (p.pid, p.out) for i, p in enumerate(procs)}
    try:
        answers = agent_procs.verify_workloads(
            named, timeout_s, alive=lambda pid: by_pid[pid].popen.poll() is None
        )
    except AgentError as e:
        raise HostError(str(e)) from e
    return [parse_verified(line, name) for name, line in answers]


Source = Callable[[], list[Verification]]


@dataclass
class IntegrityLog:
    """A trial's checks. Sources are the workloads to ask (guests, host copies, lab
    processes); clock gives ts_ns on the clock the trial's other tables use."""

    clock: Callable[[], int] = time.monotonic_ns
    sources: list[Source] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add_source(self, source: Source) -> None:
        self.sources.append(source)

    def check(self, phase: str, step: int = 0) -> list[Verification]:
        """Verify every workload now; raises IntegrityError after recording the rows
        when any page differs from its pattern."""
        results = [v for source in self.sources for v in source()]
        self.record(phase, step, results)
        return results

    def record(self, phase: str, step: int, results: Sequence[Verification]) -> None:
        ts = self.clock()
        for v in results:
            self.rows.append(
                {
                    "phase": phase,
                    "step": step,
                    "workload": v.workload,
                    "pages_checked": v.pages,
                    "mismatches": v.mismatches,
                    "first_mismatch_pages": ",".join(map(str, v.first)),
                    "verify_s": v.verify_s,
                    "ts_ns": ts,
                }
            )
        bad = {v.workload: (v.mismatches, v.pages, v.first) for v in results if v.mismatches}
        if bad:
            raise IntegrityError(phase, step, bad)

    def table(self, trial_id: str, t0_ns: int) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=[c for c in COLUMNS if c not in ("trial_id", "t_s")])
        df.insert(0, "trial_id", trial_id)
        df["t_s"] = (df["ts_ns"] - t0_ns) / 1e9
        return df.astype(
            {"step": "int64", "pages_checked": "int64", "mismatches": "int64", "ts_ns": "int64"}
        ).astype({"verify_s": "float64", "t_s": "float64"})[list(COLUMNS)]


# ---------------------------------------------------------------- summaries


def read_table(run_dir: Path) -> pd.DataFrame | None:
    path = Path(run_dir) / f"{TABLE}.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def per_trial(df: pd.DataFrame) -> pd.DataFrame:
    """Checks, pages verified and corrupted pages per trial, with where it went wrong."""
    rows = []
    for tid, g in df.groupby("trial_id", sort=True):
        bad = g[g["mismatches"] > 0]
        rows.append(
            {
                "trial_id": str(tid),
                "checks": len(g.groupby(["phase", "step"])),
                "pages_verified": int(g["pages_checked"].sum()),
                "corrupted": int(g["mismatches"].sum()),
                "first_corrupted": "; ".join(
                    f"{r.workload} after {r.phase} {r.step}: pages {r.first_mismatch_pages}"
                    for r in bad.itertuples()
                ),
            }
        )
    return pd.DataFrame(
        rows, columns=["trial_id", "checks", "pages_verified", "corrupted", "first_corrupted"]
    )


def summary_lines(run_dir: Path) -> list[str]:
    """One line per trial for the CLI: 'pages verified N, corrupted M'."""
    df = read_table(run_dir)
    if df is None or df.empty:
        return []
    lines = []
    for r in per_trial(df).itertuples():
        line = f"{r.trial_id}: integrity {r.checks} checks, pages verified {r.pages_verified}, "
        line += f"corrupted {r.corrupted}"
        lines.append(line + (f" ({r.first_corrupted})" if r.corrupted else ""))
    return lines


def report_table(run_dirs: Sequence[Path]) -> pd.DataFrame | None:
    """The report's integrity section: per trial of every run; None when no run has
    the table (runs recorded before integrity checks existed)."""
    parts = []
    for d in run_dirs:
        df = read_table(d)
        if df is not None and not df.empty:
            parts.append(per_trial(df).assign(run_id=Path(d).name))
    if not parts:
        return None
    out = pd.concat(parts, ignore_index=True)
    return out[["run_id", *[c for c in out.columns if c != "run_id"]]]
