"""`densitylab doctor` on this machine, each line checked against the files it read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def report(lab: None) -> dict:
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cp.returncode in (0, 1), cp.stderr
    data = json.loads(cp.stdout)
    assert (cp.returncode == 0) == data["ok"]
    return data


def test_accelerator_matches_dev_kvm_and_pvm(report: dict) -> None:
    accel = report["facts"]["accel"]
    if not Path("/dev/kvm").exists():
        assert accel["value"] == "tcg"
    elif Path("/sys/module/kvm_pvm").exists():
        assert accel["value"] == "tcg" and "KVM-PVM" in accel["how"]
    else:
        assert accel["value"] == "kvm"


def test_ksm_writable_matches_sysfs(report: dict) -> None:
    ksm = report["facts"]["ksm"]
    assert ksm["value"] == os.access("/sys/kernel/mm/ksm/run", os.W_OK)
    assert (
        ksm["knobs"]["pages_to_scan"]
        == Path("/sys/kernel/mm/ksm/pages_to_scan").read_text().strip()
    )


def test_cgroup_memory_controller_location(report: dict) -> None:
    cg = report["facts"]["cgroup"]
    v2 = [
        ln.split()[1]
        for ln in Path("/proc/self/mounts").read_text().splitlines()
        if ln.split()[2] == "cgroup2"
    ]
    v2_memory = any("memory" in Path(m, "cgroup.controllers").read_text().split() for m in v2)
    if v2_memory:
        assert cg["value"] == "v2"
    elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        assert cg["value"] == "v1" and cg["memory_root"] == "/sys/fs/cgroup/memory"


def test_swap_methods_match_zram_devices(report: dict) -> None:
    swap = report["facts"]["swap"]
    free_zram = [
        p for p in Path("/sys/block").glob("zram*") if (p / "disksize").read_text().strip() == "0"
    ]
    assert ("zram" in swap["value"]) == bool(free_zram)


def test_numa_nodes_match_sysfs(report: dict) -> None:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert report["facts"]["numa"]["value"] == max(1, len(nodes))


def test_tracing_methods_match_tracefs(report: dict) -> None:
    methods = report["facts"]["tracing"]["value"]
    assert ("kprobe" in methods) == (
        "kprobe_events absent" not in report["facts"]["tracing"]["how"]
    )
    assert "tracepoint-proxy" in methods  # every kernel we target has migrate tracepoints


def test_libvirt_versions(report: dict) -> None:
    lv = report["facts"]["libvirt"]
    assert lv["value"] is not None, lv["how"]
    virsh = subprocess.run(
        ["virsh", "-c", "qemu:///system", "version"], capture_output=True, text=True, timeout=30
    ).stdout
    assert f"libvirt {lv['libvirt']}" in virsh
    assert lv["qemu"].rsplit(".", 1)[0] in virsh


def test_this_lab_machine(report: dict) -> None:
    """The facts LAB-NOTES records for this project's machines (skip elsewhere)."""
    if not Path("/sys/module/kvm_pvm").exists():
        pytest.skip("not a KVM-PVM lab machine")
    f = report["facts"]
    assert f["accel"]["value"] == "tcg"
    assert f["ksm"]["value"] is True
    assert f["cgroup"]["value"] == "v1"
    assert "zram" in f["swap"]["value"]
    assert f["numa"]["value"] == 1
    assert f["tracing"]["value"] == ["tracepoint-proxy"]
    assert report["ok"] is True
