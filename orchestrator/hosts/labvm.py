"""A lab-host VM booted here for one kernel under test: the lab image with that
kernel, two NUMA cells, reached through its guest agent (guest-exec, guest-file-*)."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from orchestrator import fleet, kernelspec, labimage
from orchestrator.errors import GuestError, HostError
from orchestrator.hosts.agent import WORK, AgentHost, ship_tools
from orchestrator.hosts.methods import HostKind
from orchestrator.spec import Spec

log = logging.getLogger(__name__)


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
    """A lab VM per kernel under test, booted at its kernel's first trial and kept for
    the run's later trials of that kernel (host.boot: per-kernel), or one per trial
    (per-trial). Each trial works in a folder of its own on the VM and removes it; a VM
    that does not answer, or whose last trial could not clean up, is replaced."""

    kind: HostKind = "labvm"

    def __init__(self, spec: Spec, run_id: str, conn: Any, domain_type: str):
        super().__init__(run_id)
        self.spec = spec
        self.conn = conn
        self.domain_type = domain_type
        self.accel = f"{domain_type}+labvm"
        self.label = "lab VM"
        self.vms: dict[str, tuple[fleet.Fleet, GuestAgentTransport, str]] = {}
        self.trials_on: dict[str, int] = {}  # VM name -> trials it ran

    def open(self, kernel: str, stack: ExitStack, trial_dir: Path) -> list[tuple[str, str]]:
        self.reset()
        notes: list[tuple[str, str]] = []
        reused = self.reusable(kernel)
        if reused is None:
            notes += self.boot(kernel, stack, trial_dir)
        else:
            self.t = reused
            fl, t, _ = self.vms[kernel]
            self.vms[kernel] = (fl, t, trial_dir.name)
            n = self.trials_on[reused.name]
            notes.append(("lab-vm-reused", f"{reused.name}: trial {n + 1} on this boot"))
        assert self.t is not None
        self.trials_on[self.t.name] = self.trials_on.get(self.t.name, 0) + 1
        self.label = f"lab VM {self.t.name}"
        self.work = f"{WORK}/{trial_dir.name}"
        self.t.run(["/bin/mkdir", "-p", self.work])
        stack.callback(self.t.run, ["/bin/rm", "-rf", self.work])
        return notes

    def boot(self, kernel: str, stack: ExitStack, trial_dir: Path) -> list[tuple[str, str]]:
        """Boot a VM with `kernel`: on the trial's stack (per-trial) or kept (per-kernel)."""
        per_trial = self.spec.host.boot == "per-trial"
        fl = fleet.Fleet(self.conn, self.run_id, f"lab-{kernel}", self.domain_type)
        if per_trial:
            stack.enter_context(fl)
        token = self.run_id.rsplit("-", 1)[-1] + f"{int(time.time()) % 100000:05d}"
        try:
            t = boot_lab_vm(fl, self.spec, kernel, trial_dir, self.run_id, token)
        except BaseException:
            if not per_trial:
                fl.teardown()
            raise
        self.t = t
        if not per_trial:
            self.vms[kernel] = (fl, t, trial_dir.name)
        notes = [("lab-vm-booted", f"{t.name} with kernel {kernel}")]
        if fl.guests[0].boot_retries:
            notes.append(
                ("boot-retry", "kernel panic before ready (TCG); booted again, console kept")
            )
        return notes

    def reusable(self, kernel: str) -> GuestAgentTransport | None:
        """The kept VM of `kernel` when it answers and its last trial cleaned up (its
        folder gone, KSM knobs and swap restored)."""
        if kernel not in self.vms:
            return None
        fl, t, last = self.vms[kernel]
        left = [f"{WORK}/{last}", self.saved("ksm"), self.saved("swap")]
        probe = " ".join(f"[ ! -e {p} ] || echo {p};" for p in left)
        try:
            found = t.run(["/bin/sh", "-c", probe], 60).split()
        except HostError as e:
            found = [f"no answer ({e})"]
        if not found:
            return t
        log.warning("%s: replaced, its last trial left %s", t.name, ", ".join(found))
        del self.vms[kernel]
        for err in fl.teardown():
            log.error("lab VM teardown: %s", err)
        return None

    def close(self) -> list[str]:
        """Remove the kept VMs (at the end of the run, also after an error or Ctrl-C)."""
        done, errors = [], []
        for kernel, (fl, t, _) in list(self.vms.items()):
            errors += fl.teardown()
            done.append(f"{t.name} ({kernel}) removed after {self.trials_on.get(t.name, 0)} trials")
            del self.vms[kernel]
        if errors:
            raise HostError("lab VM teardown: " + "; ".join(errors))
        return done
