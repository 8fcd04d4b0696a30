"""The run lock's liveness rule and exact run-id matching, with real processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import agentship, cleanup, runlock
from orchestrator.agent import fs, procs
from orchestrator.errors import HostBusy, UsageError


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def owner_of(pid: int, run_id: str = "20260101-000000-x-0001") -> runlock.Owner:
    st = runlock.start_time(pid)
    assert st is not None
    return runlock.Owner(pid, st, runlock.boot_id(), run_id, "x")


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_start_time_is_field_22_of_stat(sleeper: subprocess.Popen[bytes]) -> None:
    stat = Path(f"/proc/{sleeper.pid}/stat").read_text()
    assert runlock.start_time(sleeper.pid) == int(stat.split(") ")[1].split()[19])
    assert runlock.start_time(dead_pid()) is None


def test_live_sleep_is_alive(sleeper: subprocess.Popen[bytes]) -> None:
    assert runlock.owner_alive(owner_of(sleeper.pid))


def test_dead_pid_is_gone() -> None:
    o = owner_of(1)  # a real start time, then a pid that no longer exists
    assert not runlock.owner_alive(replace(o, pid=dead_pid()))


def test_reused_pid_is_gone(sleeper: subprocess.Popen[bytes]) -> None:
    """Same pid, another start time: the pid now belongs to another process."""
    o = owner_of(sleeper.pid)
    assert not runlock.owner_alive(replace(o, start_time=o.start_time - 1))


def test_other_boot_is_gone(sleeper: subprocess.Popen[bytes]) -> None:
    o = owner_of(sleeper.pid)
    assert not runlock.owner_alive(replace(o, boot_id="00000000-0000-0000-0000-000000000000"))


def write_lock(state: Path, o: runlock.Owner) -> Path:
    path = runlock.lock_path(o.run_id, state)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(o.__dict__))
    return path


def test_second_run_refused_while_one_lives(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    other = owner_of(sleeper.pid, "20260101-000000-live-aaaa")
    write_lock(tmp_path, other)
    with pytest.raises(HostBusy) as e:
        runlock.acquire_run("20260101-000001-me-bbbb", "me", tmp_path)
    msg = str(e.value)
    assert "20260101-000000-live-aaaa" in msg and f"pid {sleeper.pid}" in msg
    assert "\n" not in msg
    assert not runlock.lock_path("20260101-000001-me-bbbb", tmp_path).exists()
    sleeper.kill()
    sleeper.wait()
    # Its owner is gone now: the host is free, and the stale lock is no obstacle.
    with runlock.acquire_run("20260101-000001-me-bbbb", "me", tmp_path) as lock:
        assert runlock.survey(tmp_path)[lock.owner.run_id].live
        assert not runlock.survey(tmp_path)["20260101-000000-live-aaaa"].live
    assert not lock.path.exists(), "a released lock leaves no file"


def test_a_held_flock_is_live_whatever_the_record_says(tmp_path: Path) -> None:
    path = write_lock(tmp_path, replace(owner_of(1), pid=dead_pid()))
    assert not runlock.inspect(path).live
    fd = runlock.open_locked(path)
    assert fd is not None
    try:
        assert runlock.inspect(path).live
        assert runlock.claim_gone(path.stem, tmp_path) is None
    finally:
        import os

        os.close(fd)


def test_resume_adopts_a_gone_owners_lock(tmp_path: Path) -> None:
    run_id = "20260101-000000-killed-cccc"
    write_lock(tmp_path, replace(owner_of(1, run_id), pid=dead_pid()))
    with runlock.acquire_run(run_id, "killed", tmp_path) as lock:
        rec = json.loads(lock.path.read_text())
        assert rec["pid"] == lock.owner.pid and rec["role"] == "run"
        # A clean of the same run cannot take it now, and a second resume is refused.
        assert runlock.claim_gone(run_id, tmp_path) is None
        with pytest.raises(HostBusy, match="run is live"):
            runlock.take(run_id, replace(lock.owner, pid=1), tmp_path)


def test_clean_refuses_empty_and_malformed_selectors() -> None:
    for bad in ([], [""], ["  "], ["../../etc"], ["a/b"], ["x\n"]):
        with pytest.raises(UsageError):
            cleanup.check_selector(bad)
    cleanup.check_selector(["20260101-000000-smoke-ab12"])


def test_samplers_match_run_ids_exactly(tmp_path: Path) -> None:
    run_id = "20260101-000000-smoke-ab12"
    out = tmp_path / run_id / "trials" / "t0" / "samples.jsonl"
    out.parent.mkdir(parents=True)
    p = subprocess.Popen(
        [*agentship.local_agent_argv(), "sample", "--out", str(out), "--stop-after-s", "30"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            if p.pid in procs.find_samplers():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert p.pid in procs.find_samplers(run_ids=[run_id])
        for other in ("", "smoke", run_id[:-1], "20260101", run_id + "x"):
            assert p.pid not in procs.find_samplers(run_ids=[other]), other
        h = next(h for h in procs.agent_helpers() if h.pid == p.pid)
        assert h.run_id == run_id and h.tag is None
    finally:
        p.terminate()
        p.wait()


def test_collector_tag_matches_its_run_exactly() -> None:
    h = procs.AgentHelper(
        1, ["python3", "hostagent.py", "trace", "--tag", "20260101_000000_smoke_ab12"]
    )
    assert h.serves("20260101-000000-smoke-ab12")
    assert not h.serves("20260101-000000-smoke-ab1")
    assert not h.serves("")


def saved_ksm(state: Path, run_id: str, knobs: dict[str, str]) -> Path:
    p = state / f"ksm-{run_id}.json"
    p.write_text(json.dumps({"ksm_dir": "/sys/kernel/mm/ksm", "knobs": knobs}))
    return p


def test_a_new_run_adopts_the_host_values_a_gone_run_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeper: subprocess.Popen[bytes]
) -> None:
    from orchestrator import runner

    monkeypatch.setattr(fs, "STATE_DIR", tmp_path)
    killed = "20260101-000000-killed-0001"
    live = "20260101-000000-live-0002"
    write_lock(tmp_path, replace(owner_of(1, killed), pid=dead_pid()))
    write_lock(tmp_path, owner_of(sleeper.pid, live))
    saved_ksm(tmp_path, killed, {"pages_to_scan": "123", "run": "0"})
    saved_ksm(tmp_path, live, {"pages_to_scan": "999", "run": "1"})
    me = "20260101-000001-me-0003"
    assert runner.adopt_saved_ksm(me) == [killed]
    mine = json.loads((tmp_path / f"ksm-{me}.json").read_text())["knobs"]
    assert mine == {"pages_to_scan": "123", "run": "0"}, "the host's values, not re-read"
    assert not (tmp_path / f"ksm-{killed}.json").exists()
    assert (tmp_path / f"ksm-{live}.json").exists(), "a live run's save is never taken"
    assert runner.adopt_saved_ksm(me) == []


def test_an_unwritable_state_folder_is_one_line(tmp_path: Path) -> None:
    from orchestrator.errors import HostError

    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the state folder should be
    with pytest.raises(HostError, match="cannot take the run lock"):
        runlock.acquire_run("20260101-000000-x-0001", "x", blocker)
