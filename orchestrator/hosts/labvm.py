"""A lab-host VM booted here for one kernel under test: the lab image with that
kernel, two NUMA cells, reached through its guest agent (guest-exec, guest-file-*)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from orchestrator import fleet, kernelspec, labimage
from orchestrator.errors import GuestError, HostError
from orchestrator.hosts.agent import AgentHost, ship_tools
from orchestrator.hosts.methods import HostKind
from orchestrator.spec import Spec


class GuestAgentTransport:
    """Commands and files through the QEMU guest agent of one domain."""

    def __init__(self, fl: fleet.Fleet, name: str):
        self.fl = fl
        self.name = name

    def run(self, argv: list[str], timeout_s: float = 120) -> str:
        try:
            r = self.fl.guest_exec(self.name, argv, timeout_s=timeout_s)
        except GuestError as e:
            raise HostError(str(e)) from e
        if r.rc != 0:
            raise HostError(
                f"{self.name}: {' '.join(argv)} exited {r.rc}: {r.stderr.strip()[-300:]}"
            )
        return r.stdout

    def read(self, path: str) -> bytes:
        try:
            return self.fl.read_file(self.name, path)
        except GuestError as e:
            raise HostError(str(e)) from e

    def write(self, path: str, data: bytes, mode: int) -> None:
        self.fl.write_file(self.name, path, data, mode)


def boot_lab_vm(
    fl: fleet.Fleet, spec: Spec, kernel: str, store_dir: Path, run_id: str, token: str
) -> GuestAgentTransport:
    """Define and boot the lab host with the kernel labelled `kernel`; ship our tools."""
    image = labimage.find_lab_image()
    k = labimage.resolve_kernel(image, kernelspec.entry_for(spec.kernels, kernel))
    name = f"dl-{token}-lab-{kernel.replace('.', '_')}"
    gs = fleet.GuestSpec(
        name=name,
        memory_mib=spec.host.memory_mib,
        vcpus=spec.host.vcpus,
        image=fleet.GuestImage(
            kernel=k.vmlinuz, initrd=k.initrd, disk=image.rootfs, cmdline=image.cmdline
        ),
        console_log=store_dir / "console" / f"{name}.log",
        overlay=fleet.OVERLAY_ROOT / run_id / f"{name}.qcow2",
        numa_cells=spec.host.numa_cells,
    )
    fl.define([gs])
    fl.start_all()
    fl.wait_ready(spec.host.boot_timeout_s)
    t = GuestAgentTransport(fl, name)
    ship_tools(t)
    return t


class LabVmHost(AgentHost):
    """One lab VM per trial, booted with the trial's kernel and destroyed after it."""

    kind: HostKind = "labvm"

    def __init__(self, spec: Spec, run_id: str, conn: Any, domain_type: str):
        super().__init__(run_id)
        self.spec = spec
        self.conn = conn
        self.domain_type = domain_type
        self.accel = f"{domain_type}+labvm"
        self.label = "lab VM"

    def open(self, kernel: str, stack: ExitStack, trial_dir: Path) -> list[tuple[str, str]]:
        self.reset()
        trial_id = trial_dir.name
        fl = stack.enter_context(fleet.Fleet(self.conn, self.run_id, trial_id, self.domain_type))
        token = self.run_id.rsplit("-", 1)[-1] + f"{int(time.time()) % 100000:05d}"
        self.t = boot_lab_vm(fl, self.spec, kernel, trial_dir, self.run_id, token)
        self.label = f"lab VM {self.t.name}"
        if fl.guests[0].boot_retries:
            return [
                ("boot-retry", "kernel panic before ready (TCG); booted once more, console kept")
            ]
        return []
