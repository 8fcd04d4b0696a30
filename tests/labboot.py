"""Booting a lab host under plain QEMU for tests (no libvirt), shared by the lab-image
and built-kernel tests."""

from __future__ import annotations

from pathlib import Path
from subprocess import Popen

import pytest

from orchestrator import fleet, labimage, qemuparts
from orchestrator.proc import spawn_group, stop_group
from tests.qga import wait_for_marker


def boot_until_ready(
    plan: labimage.BootPlan, console: Path, timeout_s: float
) -> tuple[Popen[bytes], float]:
    """Boot and wait for ready; returns QEMU and the seconds to ready. A kernel panic
    before ready gets one more boot from a fresh overlay, the policy the fleet applies
    (fleet.BOOT_RETRIES): under TCG the Debian kernels now and then panic in early
    boot, an emulator flake. The panicked console is kept beside the new one."""
    for attempt in range(1 + fleet.BOOT_RETRIES):
        plan.overlay.unlink(missing_ok=True)
        plan.agent_socket.unlink(missing_ok=True)
        qemuparts.create_overlay(plan.image.rootfs, plan.overlay)
        with console.open("wb") as log:
            qemu = spawn_group(labimage.qemu_argv(plan), stdout=log.fileno(), stderr=log.fileno())
        try:
            return qemu, wait_for_marker(console, "DENSITYLAB: ready", timeout_s)
        except pytest.fail.Exception:
            stop_group(qemu)
            text = console.read_text(errors="replace")
            if attempt == fleet.BOOT_RETRIES or fleet.PANIC_MARKER not in text:
                raise
            console.rename(console.with_name(f"{console.stem}.panic{attempt + 1}.log"))
    raise AssertionError("unreachable")
