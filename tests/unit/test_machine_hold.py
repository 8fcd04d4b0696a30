"""The agent's machine hold and a machine's sweep of trial folders, with real processes
(the agent run as a subprocess, as SSH runs it) in a private state folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.agent import hold, leftovers


def start_hold(state: Path, run_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.agent", "hold", "--run-id", run_id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "DENSITYLAB_STATE": str(state)},
    )


def answer(p: subprocess.Popen[bytes]) -> dict[str, object]:
    assert p.stdout is not None
    return dict(json.loads(p.stdout.readline()))


def test_one_run_holds_a_machine_until_its_session_closes(tmp_path: Path) -> None:
    assert hold.holder(tmp_path) is None
    first = start_hold(tmp_path, "run-a")
    try:
        assert answer(first) == {"held": "run-a"}
        assert hold.holder(tmp_path) == "run-a"
        second = start_hold(tmp_path, "run-b")
        assert answer(second) == {"busy": {"run_id": "run-a", "controller": "?"}}
        assert second.wait(timeout=10) == hold.BUSY_RC
    finally:
        assert first.stdin is not None
        first.stdin.close()  # what a dead controller's SSH session does too
        assert first.wait(timeout=10) == 0
    assert hold.holder(tmp_path) is None
    third = start_hold(tmp_path, "run-b")
    assert answer(third) == {"held": "run-b"}
    third.kill()  # killed, not released: the lock goes with the process
    third.wait(timeout=10)
    assert hold.holder(tmp_path) is None


def test_trial_folders_and_their_processes_are_found_by_run_tag(tmp_path: Path) -> None:
    tag = "20261202_101500_demo_ab12"
    work = tmp_path / tag / "t0"
    work.mkdir(parents=True)
    (tmp_path / "tracefs").mkdir()  # the agent's own folders are not a run's
    (tmp_path / "runs").mkdir()
    sleeper = subprocess.Popen(["sleep", "600"])
    (work / "w.pid").write_text(str(sleeper.pid))
    assert leftovers.work_dirs(tmp_path) == {tag: tmp_path / tag}
    assert leftovers.stop_pidfiles(tmp_path / tag) == [f"process {sleeper.pid} (w.pid)"]
    deadline = time.monotonic() + 10
    while sleeper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleeper.returncode is not None


def test_a_shared_probe_in_flight_is_not_taken_for_a_holder(tmp_path: Path) -> None:
    """`holder` (what `clean` asks) locks shared for a moment; a run taking the machine
    then must wait it out, not report the machine busy. The probe is stretched to 0.3 s
    here by holding the shared lock in this process."""
    import fcntl

    fd = os.open(hold.lock_file(tmp_path), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    run = start_hold(tmp_path, "run-a")
    try:
        time.sleep(0.3)
        os.close(fd)  # the probe ends
        assert answer(run) == {"held": "run-a"}
    finally:
        assert run.stdin is not None
        run.stdin.close()
        assert run.wait(timeout=10) == 0
