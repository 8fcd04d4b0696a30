"""KSM checks: dlcheck's result lines (recorded on real kernels) parse into results, bad
output is a typed error, the tables are tidy, the spec names checks, the table renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import checks
from orchestrator.cli import check_table
from orchestrator.errors import UsageError
from orchestrator.spec import load_spec_text

DATA = Path(__file__).resolve().parents[1] / "data" / "checks"


def recorded() -> list[tuple[str, str]]:
    """(file stem, line) for every recorded dlcheck line."""
    return [
        (p.stem, line)
        for p in sorted(DATA.glob("*.jsonl"))
        for line in p.read_text().splitlines()
        if line.strip()
    ]


@pytest.mark.parametrize(("source", "line"), recorded())
def test_recorded_lines_parse(source: str, line: str) -> None:
    name = json.loads(line)["check"]
    r = checks.parse_result_line(f"noise before\n{line}\n", name, source, 1.5)
    assert r.check == name and r.kernel == source and r.duration_s == 1.5
    assert r.status in ("PASS", "FAIL", "SKIP") and r.reason
    assert r.kernel_release  # dlcheck always says which kernel it ran on
    assert "check" not in r.figures and "status" not in r.figures
    assert all(isinstance(v, int | float | str) for v in r.figures.values())


def test_recorded_data_covers_every_check_and_status() -> None:
    lines = [json.loads(line) for _, line in recorded()]
    assert {d["check"] for d in lines} == set(checks.ALL_CHECKS)
    assert {d["status"] for d in lines} == {"PASS", "FAIL", "SKIP"}


def test_figures_keep_numbers_and_words() -> None:
    line = next(ln for _, ln in recorded() if '"mremap-swap"' in ln and "PASS" in ln)
    r = checks.parse_result_line(line, "mremap-swap", "k")
    assert r.figures["push_method"] in ("madv_pageout", "memory.reclaim", "v1-limit-steps")
    assert r.figures["swapped_out"] * 2 >= r.figures["pages"]
    assert r.figures["mismatched_pages"] == 0


@pytest.mark.parametrize(
    ("output", "why"),
    [
        ("", "no result line"),
        ("dlcheck: usage\n", "no result line"),
        ('{"check": "ksm-stat", "status": "PASS"', "not JSON"),
        ('{"check": "zero-pages", "status": "PASS", "reason": "x"}', "names check 'zero-pages'"),
        ('{"check": "ksm-stat", "status": "OK", "reason": "x"}', "status 'OK'"),
    ],
)
def test_bad_output_is_a_typed_error(output: str, why: str) -> None:
    with pytest.raises(checks.CheckOutputError, match=why) as e:
        checks.parse_result_line(output, "ksm-stat", "7.3")
    assert e.value.check == "ksm-stat"


def results() -> list[checks.CheckResult]:
    return [
        checks.parse_result_line(line, json.loads(line)["check"], kernel)
        for kernel in ("6.12", "7.3")
        for _, line in recorded()
    ]


def test_tables_are_tidy() -> None:
    rs = results()
    t = checks.tables(rs)
    assert len(t["checks"]) == len(rs)
    assert list(t["checks"].columns) == [
        "kernel", "kernel_release", "check", "status", "reason", "duration_s",
    ]  # fmt: skip
    figs = t["check_figures"]
    numeric = sum(1 for r in rs for v in r.figures.values() if not isinstance(v, str))
    assert len(figs) == numeric and figs["value"].dtype == float
    assert set(figs["figure"]) >= {"swapped_out", "scans_to_remerge", "ksm_zero_pages_rise"}


def test_empty_tables_keep_their_columns() -> None:
    t = checks.tables([])
    assert t["checks"].empty and "status" in t["checks"].columns
    assert t["check_figures"].empty and "figure" in t["check_figures"].columns


def test_table_has_a_column_per_kernel_and_a_row_per_check() -> None:
    t = check_table(results())
    assert [c.header for c in t.columns] == ["check", "6.12", "7.3"]
    assert t.row_count == len({r.check for r in results()})


def test_spec_names_checks() -> None:
    spec, _ = load_spec_text("name: a\nchecks: [ksm-stat, zero-pages]\n", "x.yaml")
    assert checks.selected(spec) == ["ksm-stat", "zero-pages"]
    spec, _ = load_spec_text("name: a\n", "x.yaml")
    assert checks.selected(spec) == list(checks.ALL_CHECKS)
    with pytest.raises(UsageError, match=r"^x.yaml: checks.0: Input should be"):
        load_spec_text("name: a\nchecks: [frobnicate]\n", "x.yaml")


def test_ksm_settings_save_what_dlcheck_writes() -> None:
    spec, _ = load_spec_text("name: a\nksm: {pages_to_scan: 500}\n", "x.yaml")
    knobs = {"pages_to_scan": "100", "run": "0", "smart_scan": "1", "use_zero_pages": "0"}
    got = checks.ksm_settings(spec, knobs)
    assert got == {"pages_to_scan": "500", "smart_scan": "1", "use_zero_pages": "0"}
    # A kernel without smart_scan (before 6.7): not named, so ksm-apply does not refuse.
    old = {"pages_to_scan": "100", "run": "0", "use_zero_pages": "0"}
    assert "smart_scan" not in checks.ksm_settings(spec, old)


def test_bad_spec_exits_2_before_anything(tmp_path: Path) -> None:
    """A check name or a kernel the lab image lacks: one line, exit 2, no run directory."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: a\nchecks: [bogus]\n")
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "check", str(spec), "--results",
         str(tmp_path / "r")],
        capture_output=True, text=True, cwd=repo, timeout=60,
    )  # fmt: skip
    assert cp.returncode == 2
    assert cp.stderr.startswith(f"densitylab: {spec}: checks.0: Input should be")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("binary", "why"),
    [
        ("/bin/false", "exited 1"),
        ("/bin/echo", "no result line"),  # prints its arguments: not a result
        ("/nonexistent/dlcheck", "exited 127"),
    ],
)
def test_a_check_that_breaks_is_its_fail_not_the_runs_end(binary: str, why: str) -> None:
    r = checks.run_one(checks.LocalTarget(), binary, "ksm-stat", "running", None)
    assert r.status == "FAIL" and r.check == "ksm-stat"
    assert r.reason.startswith("dlcheck: ") and why in r.reason


def test_dlcheck_usage_errors_exit_2() -> None:
    """The real binary, without touching KSM: bad arguments never print a result."""
    import subprocess

    dlcheck = checks.build_dlcheck()
    for argv in (["frobnicate"], ["ksm-stat", "--mib", "0"], ["ksm-stat", "extra"], []):
        cp = subprocess.run([dlcheck, *argv], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 2 and cp.stdout == ""
        assert cp.stderr.startswith("dlcheck: ")
