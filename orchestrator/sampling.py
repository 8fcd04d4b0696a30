"""Runs the host agent's sampler as a child process and turns its JSON lines into tables.

The sampler is a separate process (its own process group) so that sampling keeps its
cadence while the orchestrator waits on Ansible or libvirt, and so that the same agent
file can sample a remote lab host.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator import agentship, proc
from orchestrator.agent import ksm
from orchestrator.errors import HostError

PAGE_SIZE = 4096
# The host agent's counters, in its order; general_profit gets a unit in its name.
KSM_COLUMNS = tuple(c for c in ksm.KSM_COUNTERS if c != "general_profit")


class Sampler:
    """The host agent's `sample` subcommand, started on enter and stopped on exit."""

    def __init__(self, out: Path, pids: Mapping[str, int], interval_s: float):
        self.out = out
        self.pids = dict(pids)
        self.interval_s = interval_s
        self.proc: proc.Popen[bytes] | None = None
        self._offset = 0
        self.samples: list[dict[str, Any]] = []

    def __enter__(self) -> Sampler:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            *agentship.local_agent_argv(),
            "sample",
            "--interval-s",
            str(self.interval_s),
            "--out",
            str(self.out),
            "--parent-pid",
            str(os.getpid()),
        ]
        for name, pid in self.pids.items():
            argv += ["--pid", f"{name}={pid}"]
        self.proc = proc.spawn_group(argv, stderr=proc.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            proc.stop_group(self.proc)
            self.poll()

    def poll(self) -> list[dict[str, Any]]:
        """Read samples written since the last poll; returns all samples so far."""
        if not self.out.exists():
            return self.samples
        with open(self.out) as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a half-written last line waits
        self._offset += len(complete.encode())
        self.samples += [json.loads(line) for line in complete.splitlines() if line]
        return self.samples

    def latest(self) -> dict[str, Any] | None:
        s = self.poll()
        return s[-1] if s else None


@dataclass(frozen=True)
class PhaseMark:
    phase: str
    ts_ns: int


def label_phases(ts_ns: pd.Series, marks: Sequence[PhaseMark]) -> pd.Series:
    """The phase each timestamp falls in: the last mark at or before it."""
    if not marks:
        return pd.Series(["unknown"] * len(ts_ns), index=ts_ns.index)
    starts = np.array([m.ts_ns for m in marks])
    idx = np.searchsorted(starts, ts_ns.to_numpy(), side="right") - 1
    names = np.array([m.phase for m in marks] + ["before"], dtype=object)
    return pd.Series(names[np.where(idx < 0, len(marks), idx)], index=ts_ns.index)


def ksm_table(
    samples: Sequence[Mapping[str, Any]], trial_id: str, t0_ns: int, marks: Sequence[PhaseMark]
) -> pd.DataFrame:
    rows = []
    for s in samples:
        ksm = s["ksm"]
        row: dict[str, Any] = {c: ksm.get(c) for c in KSM_COLUMNS}
        row["general_profit_bytes"] = ksm.get("general_profit")
        row["ksmd_cpu_s"] = s.get("ksmd_cpu_s")
        row["mem_free_kib"] = s["meminfo_kib"].get("MemFree")
        row["mem_available_kib"] = s["meminfo_kib"].get("MemAvailable")
        row["ts_ns"] = s["ts_ns"]
        rows.append(row)
    cols = [
        *KSM_COLUMNS,
        "general_profit_bytes",
        "ksmd_cpu_s",
        "mem_free_kib",
        "mem_available_kib",
        "ts_ns",
    ]
    return finish(pd.DataFrame(rows, columns=cols), trial_id, t0_ns, marks)


def vmstat_table(
    samples: Sequence[Mapping[str, Any]], trial_id: str, t0_ns: int, marks: Sequence[PhaseMark]
) -> pd.DataFrame:
    rows = [
        {"ts_ns": s["ts_ns"], "counter": k, "value": v}
        for s in samples
        for k, v in s["vmstat"].items()
    ]
    return finish(pd.DataFrame(rows, columns=["ts_ns", "counter", "value"]), trial_id, t0_ns, marks)


def process_table(
    samples: Sequence[Mapping[str, Any]], trial_id: str, t0_ns: int, marks: Sequence[PhaseMark]
) -> pd.DataFrame:
    rows = []
    for s in samples:
        for guest, p in s["processes"].items():
            rows.append(
                {
                    "ts_ns": s["ts_ns"],
                    "guest": guest,
                    "pid": p["pid"],
                    "ksm_rmap_items": p.get("ksm_rmap_items"),
                    "ksm_zero_pages": p.get("ksm_zero_pages"),
                    "ksm_merging_pages": p.get("ksm_merging_pages"),
                    "ksm_process_profit_bytes": p.get("ksm_process_profit"),
                    "ram_vmas": p.get("ram_vmas"),
                }
            )
    cols = [
        "ts_ns",
        "guest",
        "pid",
        "ksm_rmap_items",
        "ksm_zero_pages",
        "ksm_merging_pages",
        "ksm_process_profit_bytes",
        "ram_vmas",
    ]
    return finish(pd.DataFrame(rows, columns=cols), trial_id, t0_ns, marks)


def finish(df: pd.DataFrame, trial_id: str, t0_ns: int, marks: Sequence[PhaseMark]) -> pd.DataFrame:
    """Add trial id, seconds since trial start and phase labels; order columns."""
    df.insert(0, "trial_id", trial_id)
    df.insert(1, "phase", label_phases(df["ts_ns"], marks) if len(df) else pd.Series(dtype=object))
    df.insert(3, "t_s", (df["ts_ns"] - t0_ns) / 1e9)
    return df


def sharing_pages(sample: Mapping[str, Any]) -> int:
    """Pages KSM saves: each sharing PTE, plus the zero pages mapped with use_zero_pages."""
    k = sample["ksm"]
    return int(k.get("pages_sharing", 0)) + int(k.get("ksm_zero_pages", 0))


class Collector:
    """The host agent's `trace` subcommand: rmap_walk_ksm latency samples to a file.

    Waits for the collector's ready line before returning from enter, so that no walk
    of the phase that follows is missed.
    """

    def __init__(self, out: Path, method: str, tag: str, ready_timeout_s: float = 60):
        self.out = out
        self.method = method
        self.tag = tag
        self.ready_timeout_s = ready_timeout_s
        self.proc: proc.Popen[bytes] | None = None

    def __enter__(self) -> Collector:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        err = self.out.with_suffix(".stderr")
        argv = [
            *agentship.local_agent_argv(),
            "trace",
            "--method",
            self.method,
            "--out",
            str(self.out),
            "--tag",
            self.tag,
            "--parent-pid",
            str(os.getpid()),
        ]
        with open(err, "wb") as errf:
            self.proc = proc.spawn_group(argv, stderr=errf.fileno())
        deadline = time.monotonic() + self.ready_timeout_s
        while b"collector: ready" not in err.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                proc.stop_group(self.proc)
                raise HostError(
                    f"latency collector ({self.method}) did not start: "
                    f"{err.read_text(errors='replace').strip()[-300:]}"
                )
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            rc = proc.stop_group(self.proc, grace_s=30)
            self.proc = None
            if rc not in (0, None) and exc[0] is None:
                raise HostError(f"latency collector ({self.method}) exited {rc}")

    def samples(self) -> pd.DataFrame:
        cols = ["ts_ns", "duration_ns", "method", "lower_bound", "pid", "comm", "rmap_one"]
        if not self.out.exists() or self.out.stat().st_size == 0:
            return pd.DataFrame(columns=cols)
        return pd.read_json(self.out, lines=True, dtype={"comm": str})


def phase_deltas(
    samples: Sequence[Mapping[str, Any]], trial_id: str, marks: Sequence[PhaseMark]
) -> pd.DataFrame:
    """Per phase: the change of every vmstat counter and KSM counter across it (long form)."""
    rows = []
    if not samples or not marks:
        return pd.DataFrame(columns=["trial_id", "phase", "counter", "delta"])
    ts = pd.Series([s["ts_ns"] for s in samples])
    phases = label_phases(ts, marks)
    for phase in dict.fromkeys(phases):
        idx = [i for i, p in enumerate(phases) if p == phase]
        # From the last sample before the phase, so its first second is not lost.
        first, last = samples[max(0, idx[0] - 1)], samples[idx[-1]]
        for group in ("vmstat", "ksm"):
            for k, v in last[group].items():
                rows.append(
                    {
                        "trial_id": trial_id,
                        "phase": phase,
                        "counter": k,
                        "delta": int(v) - int(first[group].get(k, v)),
                    }
                )
    return pd.DataFrame(rows)


def settled(seen: list[tuple[int, int]], scans: int, pct: float) -> bool:
    """True when sharing now differs by <= pct% from the newest sample >= scans back."""
    now_scans, now_pages = seen[-1]
    earlier = [pages for n, pages in seen if n <= now_scans - scans]
    return bool(earlier) and abs(now_pages - earlier[-1]) <= pct / 100 * max(now_pages, 1)
