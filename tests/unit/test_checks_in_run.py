"""Checks as part of a run's store and report: the tables `densitylab check` writes,
read back into the report's kernel x check section (recorded dlcheck lines)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from orchestrator import checks, store

DATA = Path(__file__).resolve().parents[1] / "data" / "checks"


def recorded(stem: str, kernel: str) -> list[checks.CheckResult]:
    lines = [ln for ln in (DATA / f"{stem}.jsonl").read_text().splitlines() if ln.strip()]
    return [checks.parse_result_line(ln, json.loads(ln)["check"], kernel) for ln in lines]


def test_written_tables_come_back_as_kernel_by_check(tmp_path: Path) -> None:
    st = store.RunStore.create(tmp_path, "x")
    results = recorded("labhost-6.12", "6.12") + recorded("labhost-7.3", "7.3")
    files = checks.write_tables(st, results)
    assert set(files) == {"checks.parquet", "check_figures.parquet"}
    assert (st.root / "checks" / "6.12.jsonl").read_text().count("\n") == len(
        recorded("labhost-6.12", "6.12")
    )
    t = checks.report_table([st.root])
    assert t is not None and list(t.columns) == ["check", "6.12", "7.3"]
    assert set(t["check"]) == {r.check for r in results}
    cell = t.set_index("check").loc["mremap-swap", "7.3"]
    r = next(r for r in results if r.kernel == "7.3" and r.check == "mremap-swap")
    assert cell.startswith(f"{r.status}: {r.reason}")
    assert "merged_pages=" not in cell  # the merge every check starts with is left out


def test_a_run_without_checks_has_no_section(tmp_path: Path) -> None:
    st = store.RunStore.create(tmp_path, "x")
    assert checks.report_table([st.root]) is None


def test_the_run_store_lists_the_check_tables_with_checksums(tmp_path: Path) -> None:
    """rebuild_run_tables (a run's finish) keeps the checks' tables in manifest files."""
    st = store.RunStore.create(tmp_path, "x")
    checks.write_tables(st, recorded("host-6.18", "running"))
    files = st.rebuild_run_tables()
    assert files["checks.parquet"] == store.sha256_file(st.root / "checks.parquet")
    assert "check_figures.parquet" in files


def test_record_results_names_kernel_check_and_status() -> None:
    m: dict[str, object] = {}
    rs = recorded("host-6.18", "running")
    checks.record_results(m, rs)
    assert m["check_results"] == [
        {"kernel": "running", "check": r.check, "status": r.status, "reason": r.reason} for r in rs
    ]
    assert isinstance(pd.DataFrame(m["check_results"]), pd.DataFrame)


def test_report_shows_checks_and_what_separates_a_source_pair(tmp_path: Path) -> None:
    """A run with checks.parquet and a source-built pair's differs_from: the report has
    the kernel x check section and the sentence naming the patch."""
    from orchestrator import report
    from tests.synthetic import make_run

    run = make_run(tmp_path / "runs")
    st = store.RunStore.open(run)
    checks.write_tables(st, recorded("labhost-6.12", "base") + recorded("labhost-7.3", "patched"))
    m = st.read_manifest()
    patch = {"name": "0001-x.patch", "sha256": "a" * 64}
    m["kernels"] = [
        {"name": "base", "release": "6.12.117+dl1", "origin": "source", "patches": []},
        {
            "name": "patched",
            "release": "6.12.117+dl2",
            "origin": "source",
            "patches": [patch],
            "differs_from": {
                "kernel": "base",
                "patches_added": ["0001-x.patch"],
                "patches_removed": [],
                "same_tree": True,
                "same_config": True,
            },
        },
    ]
    st.write_manifest(m)
    paths = report.write_report([run], tmp_path / "out")
    md = paths.summary_md.read_text()
    html = paths.index_html.read_text()
    sentence = "patched differs from base by: patches 0001-x.patch (same source tree, same config)."
    assert sentence in md and sentence in html
    assert "## KSM correctness checks (kernel x check)" in md
    assert "| mremap-swap |" in md.replace("  ", " ")
    assert "checks.csv" in {p.name for p in paths.tables.values()}
