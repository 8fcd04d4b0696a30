"""dlfill's done line, read by its three consumers through one parser (orchestrator/dlfill.py),
on the output of a real dlfill (tests/data/dlfill/verify-session.out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import dlfill, proc, triggers
from orchestrator.errors import HostError
from orchestrator.workload import FillResult, fill_results
from tests.conftest import DATA

SESSION = (DATA / "dlfill" / "verify-session.out").read_text()


def test_the_recorded_done_line_parses():
    d = dlfill.done_record(SESSION)
    assert d is not None
    assert (d["mib"], d["pages"], d["dup_pages"], d["vmas"], d["one_content"]) == (
        4,
        1024,
        512,
        101,
        False,
    )


def test_no_done_line_yet_is_none_and_a_non_object_is_an_error():
    assert dlfill.done_record("dlfill: filling\nDLFILL VERIFIED {}\n") is None
    with pytest.raises(ValueError, match="expected a JSON object"):
        dlfill.done_record("DLFILL DONE [1, 2]\n")


def test_the_status_play_events_give_one_fill_result_per_guest():
    events = [
        {"event": "runner_on_start", "event_data": {"host": "g0"}},
        {"event": "runner_on_ok", "event_data": {"host": "g0", "res": {"stdout": SESSION}}},
        {"event": "runner_on_ok", "event_data": {"host": "g1", "res": {"stdout": "waiting"}}},
    ]
    d = dlfill.done_record(SESSION)
    assert d is not None  # pid and address let orchestrator.pagecount follow the pages
    expected = FillResult(
        "g0", 0.002018, 512, 256, 128, 128, 101, 1024, d["pid"], int(d["addr"], 16)
    )
    assert fill_results(events) == [expected]


def test_a_host_copy_is_done_when_its_output_has_the_line(tmp_path: Path):
    out = tmp_path / "dlfill.out"
    out.write_text(SESSION)
    p = proc.spawn_group(["sleep", "30"])  # a live process, as a host copy holds its pages
    try:
        assert triggers.wait_done(out, p, timeout_s=5)["vmas"] == 101
        out.write_text("dlfill: starting\n")
        with pytest.raises(HostError, match="not done within"):
            triggers.wait_done(out, p, timeout_s=0.2)
    finally:
        proc.stop_group(p)
