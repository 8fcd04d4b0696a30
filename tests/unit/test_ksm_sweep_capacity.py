"""Capacity to a budget over swept KSM settings: per-setting figures, settings over the
budget marked, the best one named; on exact frames and on synthetic run directories."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator import report
from orchestrator.capacity import Budget, best_lines, capacity_model
from orchestrator.results import analysis as an
from tests.synthetic import KsmSetting, make_run

SETTINGS = {  # setting: (saved per guest MiB, ksmd CPU %, settle s)
    "pages_to_scan=100": (20.0, 1.0, 200.0),
    "pages_to_scan=1000": (40.0, 6.0, 30.0),
    "pages_to_scan=5000": (42.0, 25.0, 8.0),
}


def frame(settings: dict[str, tuple[float, float, float]] = SETTINGS) -> pd.DataFrame:
    rows = [
        {
            "kernel": "k",
            "status": "successful",
            "guest_memory_mib": 256.0,
            "fleet_size": 2,
            "ksm_setting": name,
            "saved_profit_mib": 2 * saved,
            "ksmd_cpu_pct": cpu + d,
            "settle_s": settle,
            "settled": True,
        }
        for name, (saved, cpu, settle) in settings.items()
        for d in (-0.5, 0.5)
    ]
    return pd.DataFrame(rows)


def model(tm: pd.DataFrame, budget: Budget, host_ram_gib: float | None = 24) -> pd.DataFrame:
    cap = capacity_model(
        tm, host_ram_gib=host_ram_gib, budget=budget, n_boot=300, rng=np.random.default_rng(1)
    )
    assert cap is not None
    return cap.table.set_index("ksm_setting")


def test_one_row_per_setting_with_its_figures_and_intervals() -> None:
    t = model(frame(), Budget())
    assert list(t.index) == list(SETTINGS)  # numeric order, not string order
    for name, (saved, cpu, settle) in SETTINGS.items():
        assert t.loc[name, "saving_per_guest_mib"] == pytest.approx(saved)
        assert t.loc[name, "ksmd_cpu_pct"] == pytest.approx(cpu)
        assert t.loc[name, "ksmd_cpu_pct_lo"] < cpu < t.loc[name, "ksmd_cpu_pct_hi"]
        assert t.loc[name, "settle_s_max"] == settle
    assert t["within_budget"].all()  # no limit: every setting keeps it
    assert t.loc["pages_to_scan=5000", "best"] and t["best"].sum() == 1


def test_settings_over_the_cpu_budget_are_marked_and_not_chosen() -> None:
    t = model(frame(), Budget(ksmd_cpu_max_pct=10))
    assert not t.loc["pages_to_scan=5000", "within_budget"]
    assert "ksmd CPU 25.0% > 10%" in t.loc["pages_to_scan=5000", "over_budget"]
    assert t.loc["pages_to_scan=1000", "best"] and t["best"].sum() == 1


def test_settle_limit_rules_out_the_slow_setting_too() -> None:
    t = model(frame(), Budget(ksmd_cpu_max_pct=5, settle_max_s=60))
    assert "settle 200 s > 60 s" in t.loc["pages_to_scan=100", "over_budget"]
    assert not t["within_budget"].any() and not t["best"].any()


def test_unsettled_and_unmeasured_settings_break_a_limit() -> None:
    tm = frame()
    tm.loc[tm["ksm_setting"] == "pages_to_scan=1000", "settled"] = False
    tm.loc[tm["ksm_setting"] == "pages_to_scan=100", "ksmd_cpu_pct"] = math.nan
    t = model(tm, Budget(ksmd_cpu_max_pct=30, settle_max_s=600))
    assert t.loc["pages_to_scan=1000", "over_budget"] == "did not settle"
    assert "not measured" in t.loc["pages_to_scan=100", "over_budget"]
    assert t.loc["pages_to_scan=5000", "best"]


def test_tie_goes_to_the_cheaper_ksmd() -> None:
    tm = frame({"a=1": (40.0, 8.0, 10.0), "a=2": (40.0, 3.0, 10.0)})
    t = model(tm, Budget(ksmd_cpu_max_pct=10), host_ram_gib=None)  # by saving per guest
    assert t.loc["a=2", "best"] and not t.loc["a=1", "best"]


def test_best_line_names_the_setting_and_what_broke_the_budget() -> None:
    cap = capacity_model(
        frame(), host_ram_gib=24, budget=Budget(ksmd_cpu_max_pct=10), rng=np.random.default_rng(0)
    )
    assert cap is not None
    (line,) = best_lines(cap)
    assert "best KSM setting within the budget (ksmd CPU <= 10% of one core)" in line
    assert "is pages_to_scan=1000: 40.0 MiB saved per guest" in line
    assert "Over the budget: pages_to_scan=5000 (ksmd CPU 25.0% > 10%)" in line


def test_no_line_without_a_sweep() -> None:
    tm = frame({"": (40.0, 3.0, 10.0)})
    cap = capacity_model(tm, host_ram_gib=24, rng=np.random.default_rng(0))
    assert cap is not None and best_lines(cap) == []


SWEEP = (
    KsmSetting("pages_to_scan=100", saving_share=0.5, ksmd_cpu_per_s=0.01, settle_s=60),
    KsmSetting("pages_to_scan=1000", saving_share=0.95, ksmd_cpu_per_s=0.05, settle_s=20),
    KsmSetting("pages_to_scan=5000", saving_share=1.0, ksmd_cpu_per_s=0.20, settle_s=6),
)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(
        tmp_path_factory.mktemp("sweep"),
        kernels=("running",),
        fleet_sizes=(2,),
        ksm_sweep=SWEEP,
        failed_trials=0,
        tables=frozenset({"trials", "ksm_samples", "guests", "events"}),
        extra_manifest={"spec": {"name": "ksm-sweep", "capacity": {"ksmd_cpu_max_pct": 10}}},
    )


def test_ksmd_cpu_is_read_over_merge_and_hold(sweep_run: Path) -> None:
    tm = an.analyze(an.load_run(sweep_run), n_boot=200).trials
    by = tm.groupby("ksm_setting")["ksmd_cpu_pct"].mean()
    # the synthetic ksmd burns rate x (0.85..1.15) CPU-s per second from the merge on
    for k in SWEEP:
        assert 85 * k.ksmd_cpu_per_s <= by[k.setting] <= 115 * k.ksmd_cpu_per_s


def test_spec_budget_applies_and_a_flag_replaces_it(sweep_run: Path) -> None:
    a = an.analyze(an.load_run(sweep_run), n_boot=200)
    t = a.capacity.table.set_index("ksm_setting")
    assert a.capacity.budget.ksmd_cpu_max_pct == 10
    assert not t.loc["pages_to_scan=5000", "within_budget"]
    assert t.loc["pages_to_scan=1000", "best"]
    wide = an.analyze(an.load_run(sweep_run), n_boot=200, budget=Budget(ksmd_cpu_max_pct=50))
    assert wide.capacity.table.set_index("ksm_setting").loc["pages_to_scan=5000", "best"]


def test_report_draws_the_trade_off_and_names_the_best(sweep_run: Path, tmp_path: Path) -> None:
    paths = report.write_report([sweep_run], tmp_path / "r")
    for ext in ("png", "pdf", "svg"):
        assert (tmp_path / "r" / f"ksm_tradeoff.{ext}").stat().st_size > 0
    summary = paths.summary_md.read_text()
    assert "best KSM setting within the budget (ksmd CPU <= 10% of one core) is " in summary
    assert "pages_to_scan=1000" in summary and "Over the budget: pages_to_scan=5000" in summary
    html = paths.index_html.read_text()
    assert 'id="fig-ksm_tradeoff"' in html and "one point per ksm setting" in html.lower()
    cap = pd.read_csv(tmp_path / "r" / "capacity.csv")
    assert len(cap) == 3 and cap["best"].sum() == 1
    fig = report.fig_ksm_tradeoff(an.analyze(an.load_run(sweep_run), n_boot=200).capacity, {})
    ax = fig.axes[0]
    assert "(%" in ax.get_xlabel() and "(MiB)" in ax.get_ylabel()
