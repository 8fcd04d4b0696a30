"""Host agent parsers against output recorded on a real host, and KSM save/restore logic."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from orchestrator import agentship
from orchestrator.agent import fs, ksm, probe, sample

DATA = Path(__file__).resolve().parents[1] / "data"


def fake_proc(tmp_path: Path, pid: int = 4242) -> Path:
    """A /proc laid out from recorded files: the host's vmstat/meminfo, a QEMU's stats."""
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    for f in ("vmstat", "meminfo", "swaps", "mounts"):
        shutil.copy(DATA / "host" / f, proc / f)
    for f in ("smaps", "ksm_stat", "stat"):
        shutil.copy(DATA / "qemu" / f, proc / str(pid) / f)
    return proc


def test_process_ksm_from_recorded_qemu(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    stats = sample.read_process_ksm(4242, proc)
    assert stats["ksm_rmap_items"] == 12500
    assert stats["ksm_process_profit"] == -800000
    # QEMU's guest RAM and ROM blocks are the mergeable mappings of the recorded process.
    recorded = (DATA / "qemu" / "smaps").read_text()
    expected = sum(1 for ln in recorded.splitlines() if ln.startswith("VmFlags:") and " mg" in ln)
    assert stats["ram_vmas"] == expected > 0


def test_recorded_process_through_the_cache(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    (proc / "4242" / "maps").write_text("00400000-00401000 r-xp 0 0:0 0 /x\n")
    cache = sample.VmaCache()
    first = sample.read_process_ksm(4242, proc, cache)
    (proc / "4242" / "ksm_stat").write_text("ksm_rmap_items 7\n")
    again = sample.read_process_ksm(4242, proc, cache)
    assert again["ram_vmas"] == first["ram_vmas"] > 0 and again["ksm_rmap_items"] == 7
    assert cache.smaps_reads == 1


def test_vmstat_keeps_ksm_swap_migration_counters(tmp_path: Path) -> None:
    v = sample.read_vmstat(fake_proc(tmp_path))
    for k in ("pswpout", "pgmigrate_success", "ksm_swpin_copy", "cow_ksm", "compact_stall"):
        assert k in v
    assert "nr_free_pages" not in v


def test_meminfo_in_kib(tmp_path: Path) -> None:
    m = sample.read_meminfo_kib(fake_proc(tmp_path))
    assert m["MemTotal"] > m["MemAvailable"] > 0


def test_cpu_seconds_from_stat(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path)
    fields = (DATA / "qemu" / "stat").read_text().rsplit(")", 1)[1].split()
    expected = (int(fields[11]) + int(fields[12])) / 100  # utime (14), stime (15) at 100 Hz
    assert sample.process_cpu_s(4242, proc) == pytest.approx(expected)


def test_choice_knob_reads_its_selected_value() -> None:
    assert ksm.knob_value("[none] scan-time\n") == "none"
    assert ksm.knob_value("2000\n") == "2000"


def test_cgroup_probe_on_recorded_mounts(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "memory").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    mounts = (DATA / "host" / "mounts").read_text()
    f = probe.probe_cgroup(mounts, root)
    assert f["value"] == "v1"
    assert "memory.limit_in_bytes" in f["how"]


def ksm_dir_copy(tmp_path: Path) -> Path:
    d = tmp_path / "ksm"
    shutil.copytree(DATA / "host" / "ksm", d)
    return d


def test_apply_saves_first_then_restore_puts_values_back(tmp_path: Path) -> None:
    kdir = ksm_dir_copy(tmp_path)
    before = ksm.read_ksm_knobs(kdir)
    saved = tmp_path / "state" / "ksm-run1.json"
    ksm.apply_ksm({"pages_to_scan": 1234, "sleep_millisecs": 7, "run": 1}, saved, kdir)
    assert json.loads(saved.read_text())["knobs"]["pages_to_scan"] == before["pages_to_scan"]
    assert ksm.read_ksm_knobs(kdir)["pages_to_scan"] == "1234"
    assert ksm.read_ksm_knobs(kdir)["run"] == "1"
    assert ksm.restore_ksm(saved) == []
    assert ksm.read_ksm_knobs(kdir) == before
    assert not saved.exists()


def test_a_second_apply_never_overwrites_the_saved_original(tmp_path: Path) -> None:
    """The SIGKILL-then-resume case: a run's knobs are in force and its saved file
    holds the host's values; applying again must keep those, not save the run's."""
    kdir = ksm_dir_copy(tmp_path)
    before = ksm.read_ksm_knobs(kdir)
    saved = tmp_path / "state" / "ksm-run1.json"
    ksm.apply_ksm({"pages_to_scan": 1234, "run": 1}, saved, kdir)  # then killed: no restore
    ksm.apply_ksm({"pages_to_scan": 1234, "sleep_millisecs": 7, "run": 0}, saved, kdir)
    knobs = json.loads(saved.read_text())["knobs"]
    assert knobs["pages_to_scan"] == before["pages_to_scan"]
    assert knobs["run"] == before["run"]
    assert knobs["sleep_millisecs"] == before["sleep_millisecs"]  # added, not re-read
    assert ksm.restore_ksm(saved) == []
    assert ksm.read_ksm_knobs(kdir) == before


def test_unknown_knob_changes_nothing(tmp_path: Path) -> None:
    kdir = ksm_dir_copy(tmp_path)
    before = ksm.read_ksm_knobs(kdir)
    with pytest.raises(fs.AgentError, match="no writable KSM knob bogus"):
        ksm.apply_ksm({"pages_to_scan": 5, "bogus": 1}, tmp_path / "s.json", kdir)
    assert ksm.read_ksm_knobs(kdir) == before
    assert not (tmp_path / "s.json").exists()


def test_run_is_written_last() -> None:
    order = [k for k, _ in ksm.ordered_for_write({"run": "1", "a": "1", "z": "2"})]
    assert order == ["a", "z", "run"]


def test_sampler_writes_json_lines_and_stops_on_sigterm(tmp_path: Path) -> None:
    import subprocess
    import time

    out = tmp_path / "s.jsonl"
    p = subprocess.Popen(
        [*agentship.local_agent_argv(), "sample", "--interval-s", "0.1", "--out", str(out)]
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) >= 3
    assert all("pages_sharing" in x["ksm"] for x in lines)
    ts = [x["ts_ns"] for x in lines]
    assert ts == sorted(ts)


def test_sampler_stops_when_its_parent_is_gone(tmp_path: Path) -> None:
    import subprocess

    out = tmp_path / "s.jsonl"
    dead = subprocess.Popen(["true"])
    dead.wait()
    p = subprocess.run(
        [
            *agentship.local_agent_argv(),
            "sample",
            "--interval-s",
            "0.05",
            "--out",
            str(out),
            "--parent-pid",
            str(dead.pid),
        ],
        timeout=20,
    )
    assert p.returncode == 0
    assert out.read_text().count("\n") == 1


def test_a_stale_stable_tree_is_pruned_only_when_nothing_is_merged(tmp_path: Path) -> None:
    """ksmd stopped and pages_shared 0: run=2 then 0 (the write order is what
    the kernel sees; a file here keeps the last value). Merged pages or a running ksmd:
    left alone."""
    kdir = ksm_dir_copy(tmp_path)
    for name, value in (("run", "0"), ("pages_shared", "0"), ("stable_node_chains", "1")):
        (kdir / name).write_text(f"{value}\n")
    assert ksm.prune_stale_stable_tree(kdir)
    assert (kdir / "run").read_text() == "0"
    (kdir / "pages_shared").write_text("3463\n")
    assert not ksm.prune_stale_stable_tree(kdir)
    (kdir / "pages_shared").write_text("0\n")
    (kdir / "run").write_text("1\n")
    assert not ksm.prune_stale_stable_tree(kdir)
    (kdir / "run").write_text("0\n")
    (kdir / "stable_node_chains").write_text("0\n")  # a leftover need not show in a counter
    assert ksm.prune_stale_stable_tree(kdir)
