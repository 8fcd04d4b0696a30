"""Two lab-host VMs reachable over SSH on loopback ports, as an inventory: booted for a
test and removed after it, with a check that nothing of them is left here (no domain,
no QEMU, no SSH master, no overlay). Shared by the lab-machine and inventory-run tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator import fleet, labimage, labvms
from orchestrator.errors import HostError


def ssh_processes() -> list[str]:
    """Command lines of ssh processes using one of our private control folders."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ssh") and any(b"dl-ssh-" in a for a in argv):
            found.append(b" ".join(argv).decode(errors="replace"))
    return found


@contextmanager
def lab_vms(directory: Path) -> Iterator[labvms.LabVms]:
    """Boot the VMs in directory (skips without a two-kernel lab image)."""
    try:
        image = labimage.find_lab_image()
    except HostError as e:
        pytest.skip(str(e))
    if len(image.kernels) < 2:
        pytest.skip("the lab image has fewer than two kernels")
    started = labvms.start(directory)
    print(f"\nlab VMs: {len(started.names)} up in {started.boot_s:.1f} s")
    try:
        yield started
    finally:
        labvms.stop(directory)
        conn = fleet.connect()
        try:
            assert fleet.tagged_domains(conn, started.run_id) == []
        finally:
            conn.close()
        qemus = subprocess.run(["pgrep", "-f", started.run_id], capture_output=True, text=True)
        assert qemus.stdout.strip() == "", f"QEMU left: {qemus.stdout}"
        assert ssh_processes() == []
        assert not (fleet.OVERLAY_ROOT / started.run_id).exists()
