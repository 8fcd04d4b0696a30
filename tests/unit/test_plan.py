from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    results: Path,
    name: str,
    spec_name: str,
    trials: list[dict[str, object]],
    wall_s: int,
    sha: str | None = None,
) -> None:
    d = results / name
    d.mkdir(parents=True)
    manifest = {
        "spec_name": spec_name,
        "spec_sha256": sha,
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


def test_runs_of_this_exact_spec_win_over_its_earlier_versions(tmp_path: Path) -> None:
    spec, _ = load_spec_text("name: a", "x")
    (t,) = plan.expand(spec)
    rec = {"trial_id": t.trial_id, "status": "successful"}
    write_run(tmp_path, "old", "a", [{**rec, "wall_s": 900}], 950, sha="aaa")
    write_run(tmp_path, "new", "a", [{**rec, "wall_s": 300}], 320, sha="bbb")
    same = plan.estimate(spec, [t], spec_history(tmp_path, "a", "bbb"))
    assert same.trial_s == [(300.0, "1 earlier run")]
    # A spec changed since (say fewer pages migrated): its old runs still beat the model,
    # but plan says where the figure came from.
    other = plan.estimate(spec, [t], spec_history(tmp_path, "a", "ccc"))
    assert other.trial_s == [(600.0, "2 earlier runs of an earlier version of the spec")]


def test_lab_host_boots_count_outside_trials() -> None:
    text = "name: a\nhost: {kind: labvm, boot: %s}\nkernels: ['6.12', '7.3']\nrepeats: 2"
    per_kernel, _ = load_spec_text(text % "per-kernel", "x")
    per_trial, _ = load_spec_text(text % "per-trial", "x")
    assert plan.overhead_s(per_kernel, plan.expand(per_kernel)) == 2 * plan.LAB_BOOT_S
    assert plan.overhead_s(per_trial, plan.expand(per_trial)) == 4 * plan.LAB_BOOT_S


def test_swept_knob_is_a_trial_dimension() -> None:
    spec, _, _ = load_spec(REPO / "experiments" / "ksm-sweep.yaml")
    trials = plan.expand(spec)
    assert len(trials) == spec.trial_count == 3 * spec.repeats
    assert [t.knobs["pages_to_scan"] for t in trials] == [100, 100, 1000, 1000, 5000, 5000]
    assert {t.knobs["sleep_millisecs"] for t in trials} == {20}  # fixed knobs in every trial
    assert [t.ksm_setting for t in trials[::2]] == [
        "pages_to_scan=100",
        "pages_to_scan=1000",
        "pages_to_scan=5000",
    ]
    assert trials[0].trial_id == "running-n2-pages_to_scan100-r0"
    assert len({t.trial_id for t in trials}) == len(trials)


def test_two_swept_knobs_make_their_product_with_fleet_sizes() -> None:
    text = (
        "name: a\nfleet: {count: [1, 2]}\nrepeats: 2\n"
        "ksm: {pages_to_scan: [100, 200], sleep_millisecs: [10, 20, 50], smart_scan: 1}"
    )
    spec, _ = load_spec_text(text, "x")
    trials = plan.expand(spec)
    assert len(trials) == spec.trial_count == 2 * 2 * 3 * 2
    settings = {(t.fleet_size, t.ksm_setting) for t in trials}
    assert len(settings) == 2 * 6
    assert (1, "pages_to_scan=200,sleep_millisecs=50") in settings
    assert all(t.knobs["smart_scan"] == 1 for t in trials)
    assert list(trials[0].knobs) == ["pages_to_scan", "sleep_millisecs", "smart_scan"]


def test_unswept_spec_keeps_its_trial_ids() -> None:
    spec, _ = load_spec_text("name: a\nfleet: {count: [1, 2]}", "x")
    assert [t.trial_id for t in plan.expand(spec)] == ["running-n1-r0", "running-n2-r0"]
    assert all(t.ksm_setting is None for t in plan.expand(spec))


def test_faster_scan_setting_estimates_shorter() -> None:
    spec, _, _ = load_spec(REPO / "experiments" / "ksm-sweep.yaml")
    slow, _, _, _, fast, _ = plan.expand(spec)
    assert plan.full_scan_s(spec, 2, slow.knobs) == pytest.approx(
        50 * plan.full_scan_s(spec, 2, fast.knobs)
    )
    assert plan.estimate_s(spec, slow) > plan.estimate_s(spec, fast)


def test_trigger_phases_add_their_steps() -> None:
    plain, _ = load_spec_text("name: a", "x")
    text = "name: a\nphases: {migrate: {enabled: true, repeats: 2}, reclaim: {enabled: true}}"
    triggered, _ = load_spec_text(text, "x")
    (p,), (t,) = plan.expand(plain), plan.expand(triggered)
    extra = 3 * plan.TRIGGER_S + plan.RESTORE_S
    assert plan.estimate_s(triggered, t) == pytest.approx(plan.estimate_s(plain, p) + extra)


def test_makespan_puts_trials_side_by_side_on_machines() -> None:
    assert plan.makespan_s([30, 20, 20, 10], 1) == 80
    assert plan.makespan_s([30, 20, 20, 10], 2) == 40  # 30+10 | 20+20
    assert plan.makespan_s([30, 20], 4) == 30  # machines left idle
    assert plan.makespan_s([], 3) == 0


def test_an_inventory_spec_is_planned_over_its_machines(tmp_path: Path) -> None:
    """The CLI reads the inventory (no SSH) and divides the trials over its machines."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    inv = tmp_path / "hosts.ini"
    inv.write_text("[lab]\nm1 ansible_host=127.0.0.1\nm2 ansible_host=127.0.0.1\n")
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"name: inv\nhost: {{kind: inventory, inventory: {inv}, pattern: lab}}\n"
        "kernels: ['6.12', '7.3']\nrepeats: 2\n"
    )
    one = plan.estimate(load_spec(spec)[0], plan.expand(load_spec(spec)[0]))
    r = CliRunner().invoke(app, ["plan", str(spec), "--results", str(tmp_path / "none")])
    assert r.exit_code == 0, r.output
    assert "trials side by side on 2 machines" in r.output
    shown_min = float(r.output.split("estimated duration: ")[1].split(" min")[0])
    serial_trials = one.total_s - one.overhead_s
    assert shown_min == pytest.approx((serial_trials / 2 + one.overhead_s) / 60, abs=0.06)
    spec.write_text(spec.read_text().replace("pattern: lab", "pattern: nothere"))
    r = CliRunner().invoke(app, ["plan", str(spec)])
    assert r.exit_code == 2 and "matches no host" in r.output
