"""Real Debian guests (fleet.image: debian) and a user's own image (fleet.image: {path})
running playbook workloads through the guest agent, with real KSM on this machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import debimage
from orchestrator.proc import run

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
IDENTITY = re.compile(r"DENSITYLAB: identity hostname=(\S+) machine-id=([0-9a-f]{32})\b")


def densitylab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def only_run_dir(results: Path) -> Path:
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_debian_fleet_runs_a_playbook_workload(
    debian_image: debimage.DebianImage, tmp_path: Path, host_untouched
) -> None:
    spec = tmp_path / "debian2.yaml"
    spec.write_text(
        "name: debian-ci\n"
        "fleet: {count: 2, vcpus: 1, memory_mib: 640, image: debian}\n"
        "workload:\n"
        "  kind: playbook\n"
        f"  playbook: {REPO}/playbooks/workloads/redis.yml\n"
        f"  load: {REPO}/playbooks/workloads/redis-load.yml\n"
        "  vars: {key_count: 4000, value_bytes: 4096, values: same}\n"
        "phases:\n"
        "  boot: {timeout_s: 240}\n"
        "  baseline: {timeout_s: 180}\n"
        "  merge: {timeout_s: 240}\n"
        "  hold: {duration_s: 2}\n"
        "  attribute: {enabled: false}\n"
    )
    cp = densitylab("run", str(spec), "--results", str(tmp_path / "r"))
    assert cp.returncode == 0, cp.stderr
    rd = only_run_dir(tmp_path / "r")
    t = pd.read_parquet(rd / "trials.parquet").iloc[0]
    assert t.status == "successful", t.reason
    assert t.baseline_settled is not None and t.total_saving_mib is not None
    # redis holds 4000 identical 4 KiB values per guest (~16 MiB): sharing grows by a
    # good part of one copy over the idle fleet's.
    assert t.total_saving_mib - t.baseline_saving_mib > 4.0
    plays = pd.read_parquet(rd / "plays.parquet")
    assert sorted(plays.play) == ["load", "load", "workload", "workload"]
    assert (plays.status == "successful").all() and (plays.failures == 0).all()
    assert plays.guest.nunique() == 2
    guests = pd.read_parquet(rd / "guests.parquet")
    assert guests.ready_s.notna().all()
    # Each guest took its own identity at first boot: its domain name as hostname and a
    # machine-id of its own (the image ships none).
    ids = {}
    for g in guests.guest:
        i = guests.guest.tolist().index(g)
        console = (rd / "trials" / t.trial_id / "console" / f"g{i}.log").read_text()
        m = IDENTITY.search(console)
        assert m is not None, console[-500:]
        assert m[1] == g
        ids[g] = m[2]
    assert len(set(ids.values())) == 2, ids
    manifest = json.loads((rd / "manifest.json").read_text())
    assert manifest["guest_image"]["label"] == "debian"
    assert manifest["guest_image"]["disk"] == str(debian_image.rootfs)
    rep = densitylab("report", str(rd), "--out", str(tmp_path / "rep"), timeout=300)
    assert rep.returncode == 0, rep.stderr
    savings = pd.read_csv(tmp_path / "rep" / "savings.csv")
    row = savings.iloc[0]
    assert row.os_alone_mib_per_guest == pytest.approx(t.baseline_saving_mib / 2, abs=0.1)
    assert row.workload_own_mib_per_guest == pytest.approx(
        row.with_workload_mib_per_guest - row.os_alone_mib_per_guest, abs=0.11
    )
    assert "The OS alone and the workload" in (tmp_path / "rep" / "summary.md").read_text()


def test_user_image_by_path_boots_and_runs_idle(
    debian_image: debimage.DebianImage, tmp_path: Path, host_untouched
) -> None:
    """The Debian image written out as one standalone qcow2 (no backing file), with the
    kernel and initrd it carries beside it, as a user would bring their own image."""
    disk = tmp_path / "mine.qcow2"
    debimage.export_qcow2(debian_image, disk)
    info = json.loads(run(["qemu-img", "info", "--output=json", str(disk)], timeout_s=60).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    shutil.copyfile(debian_image.kernel, tmp_path / "vmlinuz")
    shutil.copyfile(debian_image.initrd, tmp_path / "initrd.img")
    spec = tmp_path / "mine.yaml"
    spec.write_text(
        "name: own-image\n"
        "fleet:\n"
        "  count: 1\n"
        "  memory_mib: 512\n"
        "  image:\n"
        f"    path: {disk}\n"
        f"    kernel: {tmp_path / 'vmlinuz'}\n"
        f"    initrd: {tmp_path / 'initrd.img'}\n"
        "    cmdline: root=/dev/vda rw console=ttyS0 init=/sbin/densitylab-guest-init quiet\n"
        f"workload: {{kind: playbook, playbook: {REPO}/playbooks/workloads/idle.yml}}\n"
        "phases:\n"
        "  boot: {timeout_s: 240}\n"
        "  baseline: {timeout_s: 120}\n"
        "  merge: {timeout_s: 120}\n"
        "  hold: {duration_s: 1}\n"
        "  attribute: {enabled: false}\n"
    )
    cp = densitylab("run", str(spec), "--results", str(tmp_path / "r"))
    assert cp.returncode == 0, cp.stderr
    rd = only_run_dir(tmp_path / "r")
    t = pd.read_parquet(rd / "trials.parquet").iloc[0]
    assert t.status == "successful", t.reason
    plays = pd.read_parquet(rd / "plays.parquet")
    assert list(plays.play) == ["workload"] and plays.status.iloc[0] == "successful"
    assert plays.ok.iloc[0] >= 2  # slurp and debug: Python modules ran in the guest
    assert pd.read_parquet(rd / "guests.parquet").ready_s.notna().all()
    assert json.loads((rd / "manifest.json").read_text())["guest_image"]["disk"] == str(disk)
    # the user's file is only ever a backing file: guests wrote to their overlays
    after = json.loads(run(["qemu-img", "info", "--output=json", str(disk)], timeout_s=60).stdout)
    assert after["actual-size"] == info["actual-size"]


def test_user_image_without_an_agent_fails_naming_the_guest(
    lab: None, tmp_path: Path, host_untouched
) -> None:
    """An image that never answers the guest agent (here: a blank disk the BIOS cannot
    boot) fails its trial with one line naming the guest; nothing is left behind."""
    disk = tmp_path / "blank.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], timeout_s=60)
    spec = tmp_path / "blank.yaml"
    spec.write_text(
        "name: no-agent\n"
        f"fleet: {{count: 1, memory_mib: 256, image: {{path: {disk}}}}}\n"
        f"workload: {{kind: playbook, playbook: {REPO}/playbooks/workloads/idle.yml}}\n"
        "phases: {boot: {timeout_s: 15}, attribute: {enabled: false}}\n"
    )
    cp = densitylab("run", str(spec), "--results", str(tmp_path / "r"), timeout=300)
    assert cp.returncode != 0
    t = pd.read_parquet(only_run_dir(tmp_path / "r") / "trials.parquet").iloc[0]
    assert t.status == "failed"
    assert re.fullmatch(r"guest dl-\S+-g0: qemu-guest-agent did not answer within 15s .*", t.reason)
    assert "\n" not in t.reason
