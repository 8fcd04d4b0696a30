"""Analysis: statistics against known distributions, per-trial metrics against hand-built
samples, and run directories that are incomplete or not runs at all."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from orchestrator.capacity import capacity_model, fit_savings
from orchestrator.errors import UsageError
from orchestrator.results import analysis as an
from orchestrator.results import text as tx
from orchestrator.results.analysis.phases import _vmstat_phase_deltas as vmstat_phase_deltas
from orchestrator.walkcost import walk_cost_model
from tests.synthetic import ALL_TABLES, make_run

# --------------------------------------------------------------------------- statistics


def _rank(x_sorted: np.ndarray, value: float) -> int:
    return int(np.searchsorted(x_sorted, value, side="left"))


@pytest.mark.parametrize("q", [0.5, 0.9])
def test_quantile_interval_matches_scipy_bootstrap(q: float) -> None:
    """The Beta draw of order statistics is the resampling bootstrap, without resampling."""
    rng = np.random.default_rng(1)
    x = np.sort(rng.lognormal(2.0, 0.8, 300))

    def stat(s: np.ndarray, axis: int) -> np.ndarray:
        return np.quantile(s, q, method="inverted_cdf", axis=axis)

    ref = stats.bootstrap(
        (x,), stat, method="percentile", n_resamples=20_000, rng=np.random.default_rng(2)
    )
    mine = an.quantile_interval(x, q, n_boot=20_000, rng=np.random.default_rng(3))
    assert mine.value == np.quantile(x, q, method="inverted_cdf")
    # Both intervals end on order statistics of x: they must land on (nearly) the same ones.
    assert abs(_rank(x, mine.lo) - _rank(x, ref.confidence_interval.low)) <= 1
    assert abs(_rank(x, mine.hi) - _rank(x, ref.confidence_interval.high)) <= 1
    # And the whole bootstrap distribution agrees (an off-by-one rank would shift it by 1).
    draws = an.quantile_draws(x, q, 20_000, np.random.default_rng(4))
    ranks_mine = np.searchsorted(x, draws)
    ranks_ref = np.searchsorted(x, ref.bootstrap_distribution)
    assert abs(ranks_mine.mean() - ranks_ref.mean()) < 0.3
    assert ranks_mine.std() == pytest.approx(ranks_ref.std(), rel=0.05)


def test_ratio_of_medians_interval_covers_known_ratio() -> None:
    """Two lognormals whose medians differ by exactly 2x: the interval covers 2, the
    difference is flagged, and over 200 seeds the 95% interval covers 2 about 95% of the
    time (a broken interval, too narrow or shifted, falls well below 90%)."""
    true_ratio = 2.0
    rng = np.random.default_rng(7)
    a = rng.lognormal(math.log(true_ratio * 10), 0.6, 400)
    b = rng.lognormal(math.log(10), 0.6, 400)
    c = an.compare_samples(a, b, rng=rng)
    assert c.ratio.lo <= true_ratio <= c.ratio.hi
    assert c.significant() and c.cliffs_delta > 0.33

    covered = 0
    for seed in range(200):
        r = np.random.default_rng(seed)
        a = np.sort(r.lognormal(math.log(true_ratio * 10), 0.6, 150))
        b = np.sort(r.lognormal(math.log(10), 0.6, 150))
        est = an.quantile_ratio(a, b, 0.5, n_boot=2000, rng=r)
        covered += est.lo <= true_ratio <= est.hi
    assert 0.90 <= covered / 200 <= 0.99


def test_equal_distributions_not_flagged_in_95_percent_of_seeds() -> None:
    flagged = 0
    for seed in range(100):
        r = np.random.default_rng(seed)
        a, b = r.lognormal(3.0, 0.7, 30), r.lognormal(3.0, 0.7, 30)
        flagged += an.compare_samples(a, b, n_boot=2000, rng=r).significant()
    assert flagged <= 5


def test_a_real_difference_is_flagged_at_small_n() -> None:
    """The counterpart of the test above: 'never significant' must not pass both."""
    flagged = 0
    for seed in range(100):
        r = np.random.default_rng(seed)
        a, b = r.lognormal(3.0 + math.log(2), 0.7, 30), r.lognormal(3.0, 0.7, 30)
        flagged += an.compare_samples(a, b, n_boot=2000, rng=r).significant()
    assert flagged >= 80


def test_cliffs_delta_from_u_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 8, 60).astype(float)  # many ties on purpose
    b = rng.integers(1, 9, 45).astype(float)
    brute = np.sign(a[:, None] - b[None, :]).mean()
    c = an.compare_samples(a, b, n_boot=100, rng=rng)
    assert c.cliffs_delta == pytest.approx(brute, abs=1e-12)
    assert c.p_value == pytest.approx(stats.mannwhitneyu(a, b).pvalue)


def test_compare_samples_refuses_tiny_samples() -> None:
    c = an.compare_samples(np.array([1.0]), np.array([2.0, 3.0]), rng=np.random.default_rng())
    assert math.isnan(c.p_value) and math.isnan(c.ratio.value) and not c.significant()


def test_holm_adjustment() -> None:
    adjusted = an.holm([0.01, 0.04, 0.03, np.nan])
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adjusted[3])


def test_repeat_summary_t_interval_and_cv() -> None:
    df = pd.DataFrame({"k": ["x"] * 4 + ["y"], "m": [1.0, 2.0, 3.0, 6.0, 5.0]})
    out = an.repeat_summary(df, ["k"], ["m"]).set_index("k")
    lo, hi = stats.t.interval(0.95, 3, loc=3.0, scale=stats.sem([1, 2, 3, 6]))
    assert out.loc["x", "ci_lo"] == pytest.approx(lo) and out.loc["x", "ci_hi"] == pytest.approx(hi)
    assert out.loc["x", "cv"] == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 3.0)
    assert out.loc["y", "n"] == 1 and np.isnan(out.loc["y", "ci_lo"])


def test_t_interval_coverage_on_normal_repeats() -> None:
    hits = 0
    for seed in range(400):
        x = np.random.default_rng(seed).normal(10.0, 2.0, 5)
        row = an.repeat_summary(pd.DataFrame({"g": 0, "v": x}), ["g"], ["v"]).iloc[0]
        hits += row["ci_lo"] <= 10.0 <= row["ci_hi"]
    assert 0.91 <= hits / 400 <= 0.98


# --------------------------------------------------------------------------- per trial


def _ramp_ksm() -> pd.DataFrame:
    """One trial: nothing until merge starts at t=5 s, then +100 pages/s up to 1000."""
    t = np.arange(0.0, 30.0)
    phase = np.where(t < 5, "fill", np.where(t < 20, "merge", np.where(t < 25, "hold", "reclaim")))
    ps = np.clip((t - 5) * 100, 0, 1000)
    ps[t >= 25] = 200  # reclaim must not change the "final" value
    return pd.DataFrame({"trial_id": "t1", "phase": phase, "t_s": t, "pages_sharing": ps})


def test_merge_milestones_on_a_known_ramp() -> None:
    row = an.merge_milestones(_ramp_ksm()).set_index("trial_id").loc["t1"]
    assert row["final_pages_sharing"] == 1000
    assert row["t50_s"] == 5.0 and row["merge_rate_50_pages_per_s"] == pytest.approx(100.0)
    assert row["t90_s"] == 9.0 and row["merge_rate_90_pages_per_s"] == pytest.approx(100.0)


def test_vmstat_phase_deltas_match_a_groupby_diff(tmp_path: Path) -> None:
    """The code-array implementation against a plain pandas one, rows shuffled."""
    run = an.load_run(make_run(tmp_path, tables=frozenset({"trials", "vmstat_samples"})))
    shuffled = run.vmstat.sample(frac=1.0, random_state=3)
    mine = vmstat_phase_deltas(shuffled)
    v = run.vmstat.astype({"trial_id": str, "phase": str, "counter": str})
    v = v.sort_values(["trial_id", "counter", "ts_ns"])
    v["delta"] = v.groupby(["trial_id", "counter"])["value"].diff().fillna(0)
    ref = v.groupby(["trial_id", "phase", "counter"])["delta"].sum().reset_index()
    merged = ref.merge(mine, on=["trial_id", "phase", "counter"], suffixes=("_ref", ""))
    assert len(merged) == len(ref) == len(mine)
    np.testing.assert_allclose(merged["delta"], merged["delta_ref"])
    pgmigrate = merged[(merged["counter"] == "pgmigrate_success") & (merged["delta"] > 0)]
    assert set(pgmigrate["phase"]) <= {"migrate", "teardown"}


def test_trial_metrics_of_a_synthetic_run(tmp_path: Path) -> None:
    a = an.analyze(an.load_run(make_run(tmp_path)), n_boot=500)
    ok = an.successful(a.trials)
    assert len(a.trials) == 12 and len(ok) == 11
    assert a.trials.loc[a.trials["status"] == "failed", "saved_profit_mib"].isna().all()
    # 160 MiB of identical pages per guest: N guests save about (N - 1) x 160 MiB.
    per_fleet = ok.groupby("fleet_size")["saved_sharing_mib"].median()
    assert per_fleet[2] == pytest.approx(160, rel=0.05)
    assert per_fleet[4] == pytest.approx(480, rel=0.05)
    assert (ok["ksmd_cpu_s_per_gib"] > 0).all() and ok["fill_s_max"].notna().all()
    assert a.kernels == ["6.12", "7.3"]


def test_latency_tables(tmp_path: Path) -> None:
    a = an.analyze(an.load_run(make_run(tmp_path)), n_boot=500)
    lat = a.latency
    assert lat is not None
    s = lat.summary
    proxy = s[s["method"] == "tracepoint-proxy"]
    assert (
        len(proxy)
        and proxy["lower_bound"].all()
        and (proxy["method_label"] == "lower-bound proxy").all()
    )
    maxima = s[s["statistic"] == "max"]
    assert maxima["lo_us"].isna().all()
    p50 = s[s["statistic"] == "p50"]
    assert ((p50["lo_us"] <= p50["value_us"]) & (p50["value_us"] <= p50["hi_us"])).all()
    # The old kernel walks the whole tree: the new one is far faster, in every trigger.
    assert (lat.comparisons["ratio_hi"] < 0.1).all() and lat.comparisons["significant"].all()
    assert set(lat.comparisons["method"]) == {"kprobe", "tracepoint-proxy"}
    assert lat.by_vmas is not None and set(lat.by_vmas["statistic"]) == {"median", "p99"}


def test_capacity_model_on_exact_savings() -> None:
    """S(N) = 150 N - 150 exactly: s = 150, c = 150, and with 256 MiB guests on 24 GiB
    minus 2 GiB: floor((22528 - 150) / 106) = 211 guests, 88 without KSM."""
    tm = pd.DataFrame(
        {
            "kernel": "k",
            "status": "successful",
            "guest_memory_mib": 256.0,
            "fleet_size": [2, 2, 4, 4],
            "saved_profit_mib": [150.0, 150.0, 450.0, 450.0],
        }
    )
    cap = capacity_model(tm, host_ram_gib=24, reserve_gib=2, rng=np.random.default_rng(0))
    assert cap is not None
    row = cap.table.iloc[0]
    assert row["saving_per_added_guest_mib"] == pytest.approx(150)
    assert row["saving_offset_mib"] == pytest.approx(150)
    assert (row["guests_without_ksm"], row["guests_with_ksm"]) == (88, 211)
    assert row["guests_with_ksm_lo"] == row["guests_with_ksm_hi"] == 211  # no spread
    assert "extrapolated" in row["note"]
    curve = cap.curve.set_index("guests")
    assert curve.loc[4, "used_gib_with_ksm"] == pytest.approx((4 * 256 - 450) / 1024)


def test_savings_fit_carries_uncertainty() -> None:
    rng = np.random.default_rng(4)
    n = np.repeat([2, 4, 8], 5)
    saved = 150 * n - 150 + rng.normal(0, 20, len(n))
    fit = fit_savings(n, saved, rng=rng)
    lo, hi = np.quantile(fit.s_draws, [0.025, 0.975])
    assert lo < fit.s < hi and lo <= 150 <= hi and hi - lo > 1


# --------------------------------------------------------------------------- bad input


def test_not_a_run_directory_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"manifest\.json"):
        an.load_run(tmp_path)
    with pytest.raises(UsageError, match="no such run directory"):
        an.load_run(tmp_path / "absent")


def test_bad_manifest_and_tables_name_the_file(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"manifest\.json: cannot read"):
        an.load_run(run)
    run = make_run(tmp_path, run_id="r2")
    (run / "ksm_samples.parquet").write_bytes(b"garbage, not parquet")
    with pytest.raises(UsageError, match=r"ksm_samples\.parquet"):
        an.load_run(run)
    run = make_run(tmp_path, run_id="r3")
    (run / "trials.parquet").unlink()
    with pytest.raises(UsageError, match=r"trials\.parquet: missing"):
        an.load_run(run)
    run = make_run(tmp_path, run_id="r4")
    pd.DataFrame({"trial_id": ["x"]}).to_parquet(run / "guests.parquet")  # no guest column
    with pytest.raises(UsageError, match=r"guests\.parquet: missing column\(s\) guest"):
        an.load_run(run)


def test_minimal_run_analyses_without_optional_tables(tmp_path: Path) -> None:
    run = an.load_run(make_run(tmp_path, tables=frozenset({"trials"})))
    assert run.ksm is None and run.latency is None
    a = an.analyze(run, n_boot=200)
    assert a.latency is None and a.timeline is None and a.phase_deltas is None
    assert a.trials["saved_profit_mib"].notna().sum() == 11  # recorded by the runner
    assert not a.comparisons.empty


# --------------------------------------------------------------------------- run vs run


def test_compare_runs_refuses_different_specs(tmp_path: Path) -> None:
    a = make_run(tmp_path, run_id="a", spec_name="one")
    b = make_run(tmp_path, run_id="b", spec_name="two")
    with pytest.raises(UsageError, match="different specs"):
        an.compare_runs(a, b)
    with pytest.raises(UsageError, match=r"manifest\.json"):
        an.compare_runs(a, tmp_path)


def test_compare_runs_of_two_single_kernel_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path, run_id="a", kernels=("6.12",))
    b = make_run(
        tmp_path, run_id="b", kernels=("7.3",), seed=1, extra_manifest={"qemu_version": "8.0.0"}
    )
    result = an.compare_runs(a, b, n_boot=500)
    assert result.pairs == [("6.12", "7.3")]
    assert any("QEMU version differs" in w for w in result.warnings)
    lat = result.latency
    assert lat is not None and (lat["ratio"] < 0.1).all()  # B (7.3) walks far faster
    assert (lat["median_a_us"] > lat["median_b_us"]).all()  # A's median is A's
    text = tx.render_comparison(result)
    assert "# b (B) against a (A)" in text and "7.3 lower" not in text and "B lower" in text
    assert "| kernel (A → B) |" in text
    plain = tx.render_comparison(result, fmt="text")
    assert "## Per-trial metrics" in plain and "|---|" not in plain


def test_combine_runs_prefixes_colliding_trial_ids(tmp_path: Path) -> None:
    a = make_run(tmp_path, run_id="a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(manifest | {"run_id": "b"}))
    run = an.combine_runs([an.load_run(a), an.load_run(b)])
    assert run.trials["trial_id"].is_unique and len(run.trials) == 24
    assert (
        run.latency is not None
        and run.latency["trial_id"].astype(str).str.startswith(("a/", "b/")).all()
    )
    assert [m["run_id"] for m in run.manifests] == ["a", "b"]


def test_hygiene_warnings(tmp_path: Path) -> None:
    a = make_run(tmp_path, run_id="a", warnings=("kernel configs differ in CONFIG_KSM",))
    b = make_run(tmp_path, run_id="b", extra_manifest={"qemu_version": "8.2.0"})
    result = an.analyze([an.load_run(a), an.load_run(b)], n_boot=200)
    text = "\n".join(result.warnings)
    assert "a: kernel configs differ in CONFIG_KSM" in text
    assert "QEMU version differs between runs (a: 7.2.0, b: 8.2.0)" in text
    assert "TCG emulation" in text and "kernels ran in blocks" in text
    assert "failed trial(s) left out" in text and "lower-bound proxy" in text


def test_all_tables_listed() -> None:
    """The analysis reads the schema's tables (integrity.parquet is read by
    orchestrator.integrity: CLI summary, report section; workload_pages.parquet is the
    per-guest detail of trials.pagecount_saving_mib, ksm_settings.parquet that of
    trials.ksm_setting, plays.parquet the per-guest record of a playbook workload's plays)."""
    assert {t.name for t in an.RUN_FIELDS.values()} == set(ALL_TABLES) - {
        "integrity",
        "workload_pages",
        "ksm_settings",
        "plays",
    }


# --------------------------------------------------------------------------- attribution


def test_rows_never_pool_workloads(tmp_path: Path) -> None:
    """Reclaim once pooled every workload under the fragmented copy's VMA count and read
    "7.3 higher"; now each workload is its own row and unattributed walks stand apart."""
    run = make_run(tmp_path, pattern_process=True, one_content=True)
    lat = an.analyze(an.load_run(run), n_boot=300).latency
    assert lat is not None and lat.n_unattributed > 0
    c = lat.comparisons[lat.comparisons["method"] == "kprobe"].set_index(["trigger", "workload"])
    assert not c.index.duplicated().any()
    one_vma = "host-process, distinct, 1 VMA, 2 mappings/page"
    big = "host-copy, distinct, 10,000 VMAs, 2 mappings/page"
    for trigger in ("migrate", "reclaim", "compaction"):
        assert 0.5 < c.loc[(trigger, one_vma), "ratio"] < 0.9  # ~2.7 µs against ~1.9 µs
        assert c.loc[(trigger, big), "ratio"] < 0.001  # ~12 ms against ~2.5 µs
        assert c.loc[(trigger, "unattributed"), "vmas"] is pd.NA
    unattributed = lat.summary[lat.summary["workload"] == "unattributed"]
    assert unattributed["vmas"].isna().all() and unattributed["mappings"].isna().all()
    assert any(
        "could not be attributed" in w
        for w in an.hygiene_warnings(an.load_run(run), an.trial_metrics(an.load_run(run)), lat)
    )


def test_a_run_before_attribution_reads_as_unattributed(tmp_path: Path) -> None:
    a = an.analyze(an.load_run(make_run(tmp_path, attributed=False)), n_boot=200)
    lat = a.latency
    assert lat is not None and list(lat.workloads.index) == ["unattributed"]
    assert lat.n_unattributed == lat.n_samples and lat.summary["vmas"].isna().all()
    assert lat.by_vmas is None and lat.walk_cost is None  # no VMA count to stand on


def test_count_levels_merge_near_equal_counts_and_bin_continuous_ones() -> None:
    assert list(an.count_levels(np.array([10003, 1, 2000, 10000, 2001]))) == [
        10000,
        1,
        2000,
        10000,
        2000,
    ]
    continuous = np.arange(1, 20_000, 7)
    levels = an.count_levels(continuous)
    assert len(np.unique(levels)) <= 15  # powers of two, each named by a member
    assert (np.floor(np.log2(levels)) == np.floor(np.log2(continuous))).all()


def _summary_points(kernel: str, ys: dict[int, float], mappings: int = 2) -> list[dict]:
    return [
        {
            "kernel": kernel,
            "trigger": "migrate",
            "method": "kprobe",
            "workload": f"w{v}-{mappings}",
            "target_kind": "host-copy",
            "pattern": "distinct",
            "vmas": v,
            "mappings": mappings,
            "statistic": "p50",
            "value_us": y,
            "n": 100,
        }
        for v, y in ys.items()
    ]


def test_walk_cost_model_fits_known_lines() -> None:
    """Old: 2 µs + 1.2 µs per VMA exactly; new: 2 µs whatever the count."""
    old = {v: 2.0 + 1.2 * v for v in (1, 2000, 10000)}
    new = {v: 2.0 for v in (1, 2000, 10000)}
    rows = _summary_points("6.12", old) + _summary_points("7.3", new)
    rows += _summary_points("6.12", {10000: 1.2 * 10000 * 128}, mappings=256)
    wc = walk_cost_model(pd.DataFrame(rows), ["6.12", "7.3"])
    assert wc is not None
    fits = wc.fits

    def fit(kernel: str, x: str) -> pd.Series:
        (row,) = [r for _, r in fits[(fits["kernel"] == kernel) & (fits["x"] == x)].iterrows()]
        return row

    old_fit = fit("6.12", "vmas")  # at 2 mappings/page: the 256 level has one VMA count
    assert old_fit["held"] == 2 and old_fit["n_points"] == 3
    assert old_fit["slope_us"] == pytest.approx(1.2) and old_fit["linear_r2"] == pytest.approx(1)
    assert old_fit["shape"] == "grows ~linearly"
    assert fit("7.3", "vmas")["shape"] == "flat"
    assert fit("6.12", "mappings")["n_points"] == 2  # 2 and 256 at 10,000 VMAs
    assert fit("7.3", "mappings")["note"].startswith("not fitted")  # one mapping count
    assert wc.sentences[0].startswith("6.12") and "+1,200 µs per 1,000 VMAs" in wc.sentences[0]
    assert wc.sentences[1].startswith("7.3") and "flat in VMAs" in wc.sentences[1]


def test_walk_cost_fits_each_walk_function_apart() -> None:
    """Old kernel, two walks per page moved: the one that stops once the page is
    unmapped costs half. Pooled they would zig-zag; apart each is an exact line."""
    rows = []
    for walk, per_vma in (("try_to_migrate_one", 0.6), ("remove_migration_pte", 1.2)):
        points = _summary_points("6.12", {v: 2.0 + per_vma * v for v in (1, 2000, 10000)})
        rows += [r | {"workload": f"{r['workload']}-{walk}", "rmap_one": walk} for r in points]
    wc = walk_cost_model(pd.DataFrame(rows), ["6.12"])
    assert wc is not None
    vmas = wc.fits[wc.fits["x"] == "vmas"].set_index("rmap_one")
    assert vmas.loc["try_to_migrate_one", "slope_us"] == pytest.approx(0.6)
    assert vmas.loc["remove_migration_pte", "slope_us"] == pytest.approx(1.2)
    assert (vmas["n_points"] == 3).all()
    assert "migrate via try_to_migrate_one grows ~linearly" in wc.sentences[0]
    assert "+1,200 µs per 1,000 VMAs" in wc.sentences[0]


def test_walk_cost_refuses_a_single_vma_count() -> None:
    wc = walk_cost_model(pd.DataFrame(_summary_points("6.12", {2000: 5.0})), ["6.12"])
    assert wc is not None and (wc.fits["note"].str.startswith("not fitted")).all()
    assert "not fitted" in wc.sentences[0]


def test_trial_level_comparison_needs_two_trials_and_calls_with_enough(tmp_path: Path) -> None:
    assert an.min_attainable_p(3, 3) == pytest.approx(0.1)
    assert an.trial_repeats_needed(1) == 4 and an.trial_repeats_needed(6) == 5
    one = make_run(tmp_path, run_id="one", repeats=1, fleet_sizes=(2,), failed_trials=0)
    lat = an.analyze(an.load_run(one), n_boot=200).latency
    assert lat is not None
    t = lat.trial_comparisons
    assert t["p_value"].isna().all()
    assert set(tx.comparison_display(t)["verdict"]) == {"too few samples"}
    three = make_run(tmp_path, run_id="three", repeats=3, fleet_sizes=(2,), failed_trials=0)
    lat = an.analyze(an.load_run(three), n_boot=200).latency
    assert lat is not None
    t = lat.trial_comparisons
    assert (t["n_a"] == 3).all() and t["p_value"].notna().all() and t["ratio_hi"].lt(0.1).all()
    assert "too few samples" not in set(tx.comparison_display(t)["verdict"])


def test_capacity_not_applicable_when_guests_are_host_processes(tmp_path: Path) -> None:
    a = an.analyze(an.load_run(make_run(tmp_path, guest_kind="host-process")), n_boot=200)
    assert a.capacity is None and a.capacity_note is not None
    assert a.capacity_note.startswith("not applicable: the guests are host processes")
    vms = an.analyze(an.load_run(make_run(tmp_path, run_id="vms", guest_kind="vm")), n_boot=200)
    assert vms.capacity is not None and vms.capacity_note is None


def test_rmap_bench_states_the_published_figures(tmp_path: Path) -> None:
    run = make_run(tmp_path, spec_name="rmap-bench", one_content=True)
    a = an.analyze(an.load_run(run), n_boot=200)
    pub = a.published
    assert pub is not None
    assert list(pub.iloc[0][["VMAs", "max before (ms)", "max after (ms)"]]) == [20000, 705, 1.7]
    ours = pub.iloc[1:]
    assert set(ours["trigger"]) == {"migrate", "reclaim", "compaction"}
    assert (ours["VMAs"] == 10000).all() and (ours["max ratio before/after"] > 1000).all()
    plain = an.analyze(an.load_run(make_run(tmp_path, run_id="plain")), n_boot=200)
    assert plain.published is None


def test_ecdf_points_carry_their_groups_walk_count() -> None:
    from orchestrator.results.analysis.latency import LatencyKey, latency_ecdf

    fields = {f: "x" for f in LatencyKey._fields}
    many = LatencyKey(**(fields | {"kernel": "6.12"}))
    one = LatencyKey(**(fields | {"kernel": "7.3"}))
    e = latency_ecdf({many: np.arange(1, 10_001) * 1000, one: np.array([5000])}, points=40)
    assert set(e.loc[e.kernel == "6.12", "n_walks"]) == {10_000}
    assert len(e.loc[e.kernel == "6.12"]) < 100  # bounded points, the count kept apart
    lone = e.loc[e.kernel == "7.3"]
    assert lone[["duration_us", "fraction", "n_walks"]].values.tolist() == [[5.0, 1.0, 1]]
