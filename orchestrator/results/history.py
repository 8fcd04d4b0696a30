"""Earlier runs of a spec, as `plan` uses them: how long each trial and the rest of the
run (lab boots, kernel switches, checks) took here. Read from manifests only."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass
class History:
    """Seconds measured by earlier successful trials of one spec, per trial id."""

    runs: int = 0
    # False when no earlier run had this exact spec and these are runs of an earlier
    # version of it (same name): a changed page count or repeat count makes them stale.
    same_spec: bool = True
    trial_s: dict[str, list[float]] = field(default_factory=dict)
    overhead_s: list[float] = field(default_factory=list)  # run wall minus its trials

    def trial(self, trial_id: str) -> float | None:
        got = self.trial_s.get(trial_id)
        return statistics.median(got) if got else None

    def overhead(self) -> float | None:
        return statistics.median(self.overhead_s) if self.overhead_s else None


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def finished_runs(results: Path, spec_name: str) -> list[dict[str, Any]]:
    """Manifests of spec_name's runs under results that recorded trial wall times."""
    out = []
    for path in sorted(results.glob("*/manifest.json")) if results.is_dir() else []:
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if m.get("spec_name") == spec_name and any(
            t.get("wall_s") is not None for t in m.get("trials", [])
        ):
            out.append(m)
    return out


def spec_history(results: Path, spec_name: str, spec_sha256: str | None = None) -> History:
    """Every finished run of spec_name under results (one folder per run): those of this
    exact spec (spec_sha256) where there are any, else those of its earlier versions.
    Runs from before trials recorded their wall time are left out."""
    runs = finished_runs(results, spec_name)
    same = [m for m in runs if spec_sha256 is not None and m.get("spec_sha256") == spec_sha256]
    h = History(same_spec=spec_sha256 is None or bool(same) or not runs)
    for m in same or runs:
        trials = [t for t in m["trials"] if t.get("wall_s") is not None]
        h.runs += 1
        for t in trials:
            if t.get("status") == "successful":
                h.trial_s.setdefault(t["trial_id"], []).append(float(t["wall_s"]))
        wall = seconds_between(m.get("started_at"), m.get("ended_at"))
        if wall is not None and all(t.get("status") == "successful" for t in trials):
            h.overhead_s.append(max(0.0, wall - sum(float(t["wall_s"]) for t in trials)))
    return h
