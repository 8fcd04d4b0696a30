"""What both ways of booting a machine build alike: the fleet's libvirt domains and the
lab host's plain QEMU boots (labimage) each need a qcow2 overlay on a shared backing file
and vCPUs split into equal NUMA cells."""

from __future__ import annotations

from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator.proc import run

QCOW2_MAGIC = b"QFI\xfb"


def create_overlay(backing: Path, overlay: Path) -> None:
    """A qcow2 overlay on a shared, never-written backing file (one per guest and boot);
    the backing file's format (qcow2 or raw) read from its magic."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    with open(backing, "rb") as f:  # the magic only: backing files can be GiBs
        fmt = "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(backing), str(overlay)],
        timeout_s=60,
    )


def convert_to_qcow2(src: Path, dest: Path) -> None:
    """src (raw or qcow2) copied into one standalone qcow2 file, no backing file."""
    with open(src, "rb") as f:
        fmt = "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    run(["qemu-img", "convert", "-q", "-f", fmt, "-O", "qcow2", str(src), str(dest)],
        timeout_s=600)  # fmt: skip


def cell_cpus(vcpus: int, cells: int) -> list[str]:
    """vCPU ranges of equal NUMA cells: 4 vCPUs in 2 cells -> ['0-1', '2-3'], 2 in 2 ->
    ['0', '1']; one cell (or none) -> []. Raises UsageError when they do not split evenly."""
    if cells <= 1:
        return []
    if vcpus % cells:
        raise UsageError(f"{vcpus} vCPUs cannot be split into {cells} equal NUMA cells")
    per = vcpus // cells
    return [f"{c * per}-{c * per + per - 1}" if per > 1 else str(c) for c in range(cells)]
