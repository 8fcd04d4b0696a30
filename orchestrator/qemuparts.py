"""What both ways of booting a machine build alike: the fleet's libvirt domains and the
lab host's plain QEMU boots (labimage) each need a qcow2 overlay on a shared backing file
and vCPUs split into equal NUMA cells."""

from __future__ import annotations

from pathlib import Path

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
