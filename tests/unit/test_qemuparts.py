"""The pieces both boot paths share: overlays (with the real qemu-img) and NUMA cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.proc import run
from orchestrator.qemuparts import cell_cpus, create_overlay


def backing_format(overlay: Path) -> str:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(overlay)]).stdout)
    return str(info["backing-filename-format"])


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_an_overlay_names_its_backing_files_format(tmp_path: Path):
    raw = tmp_path / "rootfs.img"
    raw.write_bytes(b"\0" * (1 << 20))
    qcow = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"])
    for backing, fmt in ((raw, "raw"), (qcow, "qcow2")):
        overlay = tmp_path / "run" / f"{fmt}.qcow2"  # its folder is made
        create_overlay(backing, overlay)
        assert backing_format(overlay) == fmt
    assert raw.read_bytes() == b"\0" * (1 << 20)  # the backing file is never written


def test_vcpus_split_into_equal_cells():
    assert cell_cpus(4, 1) == []
    assert cell_cpus(2, 2) == ["0", "1"]
    assert cell_cpus(4, 2) == ["0-1", "2-3"]
    assert cell_cpus(6, 3) == ["0-1", "2-3", "4-5"]
    with pytest.raises(UsageError, match="3 vCPUs cannot be split into 2 equal NUMA cells"):
        cell_cpus(3, 2)
