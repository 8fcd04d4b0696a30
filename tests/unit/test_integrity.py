"""The integrity checks' shared logic: the DLFILL VERIFIED line (recorded from a real
dlfill whose pages were changed through /proc/PID/mem), the trial's log and its table,
and the summaries the CLI and the report show."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import integrity, store
from orchestrator.errors import HostError, IntegrityError
from orchestrator.integrity import IntegrityLog, Verification, parse_verified
from orchestrator.workload import verifications
from tests.synthetic import make_run

DATA = Path(__file__).resolve().parents[1] / "data" / "dlfill"
# dlfill --mib 4 ... --hold: verify, 27 pages changed, verify, scramble, verify
SESSION = (DATA / "verify-session.out").read_text()


def recorded() -> list[Verification]:
    return [parse_verified(ln, "g0") for ln in integrity.verified_lines(SESSION)]


def test_recorded_lines_parse() -> None:
    clean, bad, after_scramble = recorded()
    assert clean == Verification("g0", 1024, 0, (), 1, 0.000628)
    assert (bad.mismatches, bad.seq) == (27, 2)
    assert bad.first == tuple(range(3, 64, 4))  # dlfill names the first 16 of 27
    assert (after_scramble.mismatches, after_scramble.seq) == (0, 3)


@pytest.mark.parametrize(
    "line",
    [
        "DLFILL DONE {}",
        "DLFILL VERIFIED ",
        'DLFILL VERIFIED {"pages":10,"mismatches":0,"first":[],"seq":1',  # truncated read
        'DLFILL VERIFIED {"pages":10,"mismatches":0,"first":[],"seq":1}',  # no verify_s
        'DLFILL VERIFIED {"pages":10,"mismatches":1,"first":[1,2],"seq":1,"verify_s":0}',
        'DLFILL VERIFIED {"pages":10,"mismatches":11,"first":[],"seq":1,"verify_s":0}',
        'DLFILL VERIFIED {"pages":"x","mismatches":0,"first":[],"seq":1,"verify_s":0}',
    ],
)
def test_bad_lines_are_one_host_error_naming_the_workload(line: str) -> None:
    with pytest.raises(HostError, match=r"^host-dlfill-1: "):
        parse_verified(line, "host-dlfill-1")


def log_of(*batches: list[Verification]) -> IntegrityLog:
    feed = iter(batches)
    ticks = iter(range(1_000, 10_000, 1_000))
    log = IntegrityLog(clock=lambda: next(ticks))
    log.add_source(lambda: next(feed))
    return log


def test_a_mismatch_fails_loudly_with_the_page_indices_and_is_recorded() -> None:
    clean, bad, _ = recorded()
    log = log_of([clean], [clean, Verification("host-dlfill-0", 20, 3, (5, 6, 9), 4, 0.1)])
    log.check("merge")
    with pytest.raises(IntegrityError) as e:
        log.check("reclaim", 1)
    assert e.value.phase == "reclaim" and e.value.step == 1
    assert e.value.corrupted == {"host-dlfill-0": (3, 20, (5, 6, 9))}
    assert str(e.value) == (
        "integrity check after reclaim 1: host-dlfill-0: 3 of 20 pages corrupted (pages 5, 6, 9)"
    )
    df = log.table("t1", t0_ns=0)
    assert list(df.columns) == list(integrity.COLUMNS)
    assert df["mismatches"].tolist() == [0, 0, 3]
    assert df["first_mismatch_pages"].tolist() == ["", "", "5,6,9"]
    assert df["ts_ns"].tolist() == [1000, 2000, 2000]
    assert str(IntegrityError("merge", 0, {"g0": (bad.mismatches, bad.pages, bad.first)}))
    assert ", ...)" in str(IntegrityError("merge", 0, {"g0": (27, 1024, bad.first)}))


def test_no_workload_means_no_rows_but_a_typed_table() -> None:
    log = IntegrityLog()
    assert log.check("merge") == []
    df = log.table("t1", 0)
    assert df.empty and list(df.columns) == list(integrity.COLUMNS)
    assert df["pages_checked"].dtype == "int64"


def test_guest_lines_come_from_the_verify_plays_ok_events() -> None:
    lines = integrity.verified_lines(SESSION)
    events = [
        {"event": "runner_on_ok", "event_data": {"host": "g0", "res": {"stdout": lines[0]}}},
        {"event": "runner_on_ok", "event_data": {"host": "g1", "res": {"stdout": lines[1]}}},
        {"event": "runner_on_ok", "event_data": {"host": "g2", "res": {"stdout": "filling"}}},
        {"event": "playbook_on_stats", "event_data": {}},
    ]
    got = verifications(events)
    assert [(v.workload, v.mismatches) for v in got] == [("g0", 0), ("g1", 27)]


def write_integrity(run_dir: Path, rows: list[Verification], trial: str) -> None:
    log = log_of(rows)
    with contextlib.suppress(IntegrityError):  # the rows are kept all the same
        log.check("migrate", 0)
    store.write_parquet(run_dir / "integrity.parquet", log.table(trial, 0))


def test_summary_lines_per_trial(tmp_path: Path) -> None:
    run = make_run(tmp_path, repeats=1, fleet_sizes=(2,), kernels=("6.12",), failed_trials=0)
    lines = integrity.summary_lines(run)
    assert lines and all(ln.endswith("corrupted 0") for ln in lines)
    assert "pages verified 245760" in lines[0]  # 3 checks x 2 guests x 160 MiB
    clean, bad, _ = recorded()
    write_integrity(run, [clean, bad], "t9")
    (line,) = integrity.summary_lines(run)
    assert line == (
        "t9: integrity 1 checks, pages verified 2048, corrupted 27 "
        "(g0 after migrate 0: pages 3,7,11,15,19,23,27,31,35,39,43,47,51,55,59,63)"
    )


def test_report_table_over_runs_and_runs_without_checks(tmp_path: Path) -> None:
    a = make_run(tmp_path, run_id="a", repeats=1, fleet_sizes=(2,), failed_trials=0)
    old = make_run(tmp_path, run_id="old", repeats=1, fleet_sizes=(2,), failed_trials=0)
    (old / "integrity.parquet").unlink()
    assert integrity.report_table([old]) is None
    df = integrity.report_table([a, old])
    assert df is not None and set(df["run_id"]) == {"a"}
    assert df["corrupted"].eq(0).all() and df["pages_verified"].gt(0).all()
    assert list(df.columns) == [
        "run_id",
        "trial_id",
        "checks",
        "pages_verified",
        "corrupted",
        "first_corrupted",
    ]
    assert isinstance(df, pd.DataFrame)
