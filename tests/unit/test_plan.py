from __future__ import annotations

from pathlib import Path

from orchestrator import plan
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
