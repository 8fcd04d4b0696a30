"""Clean-up that never hurts a live run, and crash consistency (issue 12 items 3, 4).

Real runs on this machine: two tiny guests, small fills, short phases. A run is killed
with SIGKILL in fill, merge and reclaim and resumed; the leak census afterwards looks at
domains, QEMU processes, KSM knobs (against distinctive values set before the first
run), swap, cgroups, probes, samplers and saved state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import cleanup, fleet, runlock
from orchestrator.agent import fs, ksm, procs
from orchestrator.store import sha256_file
from tests.conftest import assert_no_tool_state

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
# Distinctive host values, so "knobs as before the first run" cannot pass by accident
# (the specs below set other values; the host's own are put back in a finally).
HOST_KNOBS = {"pages_to_scan": "123", "sleep_millisecs": "77"}
LEAN = (
    "fleet: {count: COUNT, memory_mib: 160}\n"
    "workload: {mib: 24, dup: 1.0}\n"
    "ksm: {pages_to_scan: 4000, sleep_millisecs: 10}\n"
    "sampling: {interval_s: 0.5}\n"
)


def densitylab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


class Run:
    """`densitylab run` in a child process; progress lines (stderr) read by a thread."""

    def __init__(self, spec: Path, results: Path):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(results)],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.results = results
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line)

    def wait_for(self, line_start: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(ln.startswith(line_start) for ln in self.lines):
                return
            assert self.p.poll() is None, f"run ended early: {''.join(self.lines)}"
            time.sleep(0.05)
        pytest.fail(f"{line_start!r} not reached: {''.join(self.lines)}")

    @property
    def run_dir(self) -> Path:
        (d,) = [p for p in self.results.iterdir() if p.is_dir()]
        return d


@pytest.fixture
def distinctive_ksm(lab: None) -> Iterator[dict[str, str]]:
    """Set distinctive host knob values; yield every knob as the first run finds them."""
    true_values = ksm.read_ksm_knobs()
    try:
        for k, v in HOST_KNOBS.items():
            ksm.write_knob(ksm.KSM_DIR, k, v)
        yield ksm.read_ksm_knobs()
    finally:
        for k in HOST_KNOBS:
            ksm.write_knob(ksm.KSM_DIR, k, true_values[k])


def qemu_guests() -> list[str]:
    """Command lines of QEMU processes running a densitylab guest (dl-...)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-system-x86_64") and b"guest=dl-" in b" ".join(argv):
                found.append(b" ".join(argv[:3]).decode())
    return found


def leak_census(knobs_before: dict[str, str]) -> None:
    """Nothing of any run is left on the host, and KSM is exactly as it was."""
    conn = fleet.connect()
    try:
        assert fleet.tagged_domains(conn) == [], "domains left"
    finally:
        conn.close()
    assert qemu_guests() == [], "QEMU processes left"
    assert ksm.read_ksm_knobs() == knobs_before, "KSM knobs differ from before the run"
    assert procs.find_samplers() == [], "samplers left"
    state = fs.STATE_DIR
    assert not list(state.glob("ksm-*.json")), "saved KSM state left"
    assert not list(runlock.runs_dir().glob("*.lock")), "run lock left"
    assert not list(fleet.OVERLAY_ROOT.glob("*")) if fleet.OVERLAY_ROOT.exists() else True
    assert_no_tool_state()  # swap, zram, cgroups, trace instances, kprobes, our tracefs


def rescue(results: Path) -> None:
    """If a test failed half-way, leave the shared host clean for the next one."""
    for d in results.glob("*") if results.exists() else []:
        if d.is_dir():
            cleanup.clean([d.name], force=True)


def write_spec(path: Path, name: str, count: str, extra: str) -> Path:
    path.write_text(f"name: {name}\n" + LEAN.replace("COUNT", count) + extra)
    return path


def test_clean_and_a_second_run_leave_a_live_run_alone(
    tiny_image, tmp_path: Path, host_untouched
) -> None:
    spec = write_spec(
        tmp_path / "live.yaml",
        "live-test",
        "2",
        "phases: {baseline: {enabled: false}, hold: {duration_s: 12}, merge: {timeout_s: 120}}\n",
    )
    run = Run(spec, tmp_path / "r")
    try:
        run.wait_for("running-n2-r0: merge")
        run_id = run.run_dir.name
        cp = densitylab("clean", timeout=120)
        assert cp.returncode == 0, cp.stderr
        skipped = [ln for ln in cp.stdout.splitlines() if ln.startswith("skipped")]
        assert len(skipped) == 1 and run_id in skipped[0] and "live" in skipped[0], cp.stdout
        assert "removed" not in cp.stdout, cp.stdout
        assert (fs.STATE_DIR / f"ksm-{run_id}.json").exists(), "saved KSM state removed"
        assert run.p.poll() is None, "the live run died under clean"
        t0 = time.monotonic()
        cp = densitylab("run", str(spec), "--results", str(tmp_path / "second"))
        refused_s = time.monotonic() - t0
        assert cp.returncode == 2, cp.stderr
        lines = cp.stderr.strip().splitlines()
        assert len(lines) == 1 and run_id in lines[0] and "live" in lines[0], cp.stderr
        assert not (tmp_path / "second").exists(), "the refused run created its results"
        assert refused_s < 15, refused_s  # python start-up included; no doctor, no boot
        # A run named exactly: refused too, and a substring of its id names nothing.
        cp = densitylab("clean", run_id, timeout=120)
        assert cp.returncode == 1 and "skipped" in cp.stdout and "removed" not in cp.stdout
        cp = densitylab("clean", run_id[:-1], timeout=120)
        assert cp.returncode == 0 and "nothing to clean" in cp.stdout, cp.stdout
        cp = densitylab("clean", "", timeout=60)
        assert cp.returncode == 2 and "densitylab: clean" in cp.stderr
        assert run.p.wait(timeout=400) == 0, "".join(run.lines)
    finally:
        if run.p.poll() is None:
            run.p.kill()
            run.p.wait()
            rescue(tmp_path / "r")
    t = pd.read_parquet(run.run_dir / "trials.parquet").iloc[0]
    assert t.status == "successful" and t.settled and t.attributed, t.to_dict()
    # 2 guests x 24 MiB identical: 24 MiB saved; the attribute phase measures it.
    assert t.predicted_saving_mib == pytest.approx(24.0, abs=0.5)
    assert t.measured_saving_mib == pytest.approx(t.predicted_saving_mib, rel=0.10)
    ksm = pd.read_parquet(run.run_dir / "ksm_samples.parquet")
    gaps_s = ksm.ts_ns.sort_values().diff().dropna() / 1e9
    assert gaps_s.max() < 3, f"the sampler stopped for {gaps_s.max():.1f}s"
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert manifest["files"]["ksm_samples.parquet"] == sha256_file(
        run.run_dir / "ksm_samples.parquet"
    )


RECLAIM = (
    "host_workload: {copies: 1, mib: 8, fragment_vmas: 16}\n"
    "latency: {method: auto}\n"
    "phases:\n"
    "  baseline: {enabled: false}\n"
    "  hold: {duration_s: 0}\n"
    "  attribute: {enabled: false}\n"
    "  reclaim: {enabled: true, swap: zram, swap_mib: 256, v1_limit_steps_mib: [120],\n"
    "            reclaim_mib: 16, settle_s: 1}\n"
)
PLAIN = "phases: {baseline: {enabled: false}, hold: {duration_s: 0}, attribute: {enabled: false}}\n"
CASES = {
    # fill: two trials, killed in the second, so the first must be kept as it is.
    "fill": ("[1, 2]", PLAIN, "running-n2-r0: fill"),
    "merge": ("2", PLAIN, "running-n2-r0: merge"),
    "reclaim": ("2", RECLAIM, "running-n2-r0: reclaim"),
}


@pytest.mark.parametrize("phase", list(CASES))
def test_sigkill_then_resume_finishes_and_leaves_nothing(
    tiny_image, tmp_path: Path, distinctive_ksm, host_untouched, phase: str
) -> None:
    count, extra, marker = CASES[phase]
    spec = write_spec(tmp_path / "crash.yaml", f"crash-{phase}", count, extra)
    results = tmp_path / "r"
    try:
        run = Run(spec, results)
        run.wait_for(marker)
        run.p.kill()
        run.p.wait(timeout=30)
        rundir = run.run_dir
        first = rundir / "trials" / "running-n1-r0" / "trials.parquet"
        kept = first.read_bytes() if phase == "fill" else None
        # What the killed run left: its domains, and its knobs in force (not the host's).
        conn = fleet.connect()
        try:
            assert len(fleet.tagged_domains(conn)) == 2
        finally:
            conn.close()
        assert ksm.read_ksm_knobs()["pages_to_scan"] == "4000"
        if phase == "reclaim":  # killed with swap on and a host workload in its cgroup
            assert (fs.STATE_DIR / f"swap-{rundir.name}.json").exists()
            assert Path(f"/sys/fs/cgroup/memory/densitylab-{rundir.name}").is_dir()
        cp = densitylab("run", str(spec), "--resume", str(rundir))
        assert cp.returncode == 0, cp.stderr
        assert "removed domain" in cp.stderr  # the sweep said what it removed
        if phase == "reclaim":
            assert "removed swap of run" in cp.stderr and "removed cgroup" in cp.stderr
        manifest = json.loads((rundir / "manifest.json").read_text())
        statuses = {t["trial_id"]: t["status"] for t in manifest["trials"]}
        assert set(statuses.values()) == {"successful"}, statuses
        assert "running-n2-r0" in statuses
        for name, sha in manifest["files"].items():
            assert sha256_file(rundir / name) == sha, name
        trials = pd.read_parquet(rundir / "trials.parquet")
        assert sorted(trials.trial_id) == sorted(statuses)
        assert (rundir / "unfinished" / "running-n2-r0.1").is_dir()
        if kept is not None:
            assert "skipped running-n1-r0: finished in the resumed run" in cp.stdout
            assert first.read_bytes() == kept
        leak_census(distinctive_ksm)
    finally:
        rescue(results)
