from __future__ import annotations

import json
from pathlib import Path

from orchestrator import plan
from orchestrator.results.history import spec_history
from orchestrator.spec import load_spec, load_spec_text

REPO = Path(__file__).resolve().parents[2]


def test_sweep_gives_one_trial_per_fleet_size() -> None:
    spec, _, _ = load_spec(REPO / "experiments" / "sweep.yaml")
    trials = plan.expand(spec)
    assert [t.fleet_size for t in trials] == [1, 2, 4]
    assert len({t.trial_id for t in trials}) == 3


def test_repeats_multiply_trials() -> None:
    spec, _ = load_spec_text("name: a\nfleet: {count: [1, 2]}\nrepeats: 3", "x")
    trials = plan.expand(spec)
    assert len(trials) == 6
    assert sorted({t.repeat for t in trials}) == [0, 1, 2]


def test_estimate_grows_with_fleet_size() -> None:
    spec, _ = load_spec_text("name: a\nfleet: {count: [1, 8]}", "x")
    small, big = plan.expand(spec)
    assert plan.estimate_s(spec, big) > plan.estimate_s(spec, small) > 0


def write_run(
    results: Path, name: str, spec_name: str, trials: list[dict[str, object]], wall_s: int
) -> None:
    d = results / name
    d.mkdir(parents=True)
    manifest = {
        "spec_name": spec_name,
        "started_at": "2026-12-02T10:00:00+00:00",
        "ended_at": f"2026-12-02T10:{wall_s // 60:02d}:{wall_s % 60:02d}+00:00",
        "trials": trials,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_estimate_uses_earlier_runs_of_the_spec(tmp_path: Path) -> None:
    spec, _ = load_spec_text("name: a\nfleet: {count: [1, 8]}", "x")
    small, big = plan.expand(spec)

    def rec(t: plan.Trial, wall_s: float, status: str = "successful") -> dict[str, object]:
        return {"trial_id": t.trial_id, "status": status, "wall_s": wall_s}

    write_run(tmp_path, "r1", "a", [rec(small, 100), rec(big, 300)], 430)
    write_run(tmp_path, "r2", "a", [rec(small, 120), rec(big, 5, "failed")], 160)
    write_run(tmp_path, "r3", "other", [rec(small, 1)], 9)
    write_run(tmp_path, "old", "a", [{"trial_id": small.trial_id, "status": "successful"}], 999)
    h = spec_history(tmp_path, "a")
    assert h.runs == 2
    est = plan.estimate(spec, [small, big], h)
    assert est.trial_s == [(110.0, "2 earlier runs"), (300.0, "2 earlier runs")]
    assert (est.overhead_s, est.overhead_from) == (30.0, "2 earlier runs")  # r2 had a failure
    fresh = plan.estimate(spec, [small, big], spec_history(tmp_path / "none", "a"))
    assert [src for _, src in fresh.trial_s] == ["model", "model"]
    assert fresh.total_s == plan.estimate_s(spec, small) + plan.estimate_s(spec, big)


def test_lab_host_boots_count_outside_trials() -> None:
    text = "name: a\nhost: {kind: labvm, boot: %s}\nkernels: ['6.12', '7.3']\nrepeats: 2"
    per_kernel, _ = load_spec_text(text % "per-kernel", "x")
    per_trial, _ = load_spec_text(text % "per-trial", "x")
    assert plan.overhead_s(per_kernel, plan.expand(per_kernel)) == 2 * plan.LAB_BOOT_S
    assert plan.overhead_s(per_trial, plan.expand(per_trial)) == 4 * plan.LAB_BOOT_S
