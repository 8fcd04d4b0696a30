"""A KSM knob sweep with real guests and real KSM: each swept value is applied in its
trial (ksm_settings in force), recorded in the trials table, and the report holds the
settings to the spec's budget and draws the trade-off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def densitylab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def test_two_scan_rates_are_applied_recorded_and_reported(
    tiny_image, tmp_path: Path, host_untouched
) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        "name: knob-sweep-test\nfleet: {count: 2, memory_mib: 96}\n"
        "workload: {mib: 16, dup: 0.9, unique: 0.1}\n"
        "ksm: {pages_to_scan: [500, 4000], sleep_millisecs: 20, smart_scan: 0}\n"
        "phases: {baseline: {enabled: false}, attribute: {enabled: false},\n"
        "         hold: {duration_s: 5}, merge: {timeout_s: 120, settle_scans: 3}}\n"
        "capacity: {ksmd_cpu_max_pct: 50, settle_max_s: 120}\nhost_reserve_mib: 1024\n"
    )
    cp = densitylab("run", str(spec), "--results", str(tmp_path / "r"))
    assert cp.returncode == 0, cp.stderr
    (run,) = [p for p in (tmp_path / "r").iterdir() if p.is_dir()]
    trials = pd.read_parquet(run / "trials.parquet").set_index("ksm_setting")
    assert sorted(trials.index) == ["pages_to_scan=4000", "pages_to_scan=500"]
    assert (trials.status == "successful").all()
    knobs = pd.read_parquet(run / "ksm_settings.parquet")
    pts = knobs[knobs.knob == "pages_to_scan"].merge(
        trials.reset_index()[["trial_id", "ksm_setting"]], on="trial_id"
    )
    assert (pts.requested == pts.in_force).all() and pts.swept.all()
    assert set(pts.in_force) == {"500", "4000"}
    out = tmp_path / "report"
    cp = densitylab("report", str(run), "--out", str(out))
    assert cp.returncode == 0, cp.stderr
    assert (out / "ksm_tradeoff.png").stat().st_size > 0
    cap = pd.read_csv(out / "capacity.csv").set_index("ksm_setting")
    # the faster scan costs ksmd more CPU per second
    assert (
        cap.loc["pages_to_scan=4000", "ksmd_cpu_pct"] > cap.loc["pages_to_scan=500", "ksmd_cpu_pct"]
    )
    assert cap["best"].sum() == 1
    assert "best KSM setting within the budget" in (out / "summary.md").read_text()
