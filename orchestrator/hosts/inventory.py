"""A lab machine from an Ansible inventory as a trial host: reached over SSH
(orchestrator.inventory owns SSH), switched into the trial's kernel (kexec by default),
driven through the host agent like a lab VM. One object per machine serves every trial
that machine runs; at the end of the run it goes back to the kernel it ran before."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from orchestrator import inventory as inv
from orchestrator import kbuild
from orchestrator.errors import HostError, UsageError
from orchestrator.hosts.agent import WORK, AgentHost
from orchestrator.hosts.methods import HostKind
from orchestrator.lab import cpu_model
from orchestrator.spec import Spec

# What a kernel we copy to a lab machine must have for the machine to come back on it
# over SSH and be switched back by kexec. (Its NIC's driver cannot be checked here: on
# real hardware build from defconfig or the machine's own config, not tinyconfig.)
MACHINE_NEEDS = ("CONFIG_INET", "CONFIG_KEXEC|CONFIG_KEXEC_FILE")


def check_kernels(spec: Spec) -> None:
    """Before anything is touched: every kernel without a package (source, build, deb)
    can run on a lab machine. UsageError naming the kernel and what it lacks."""
    for entry in spec.kernels:
        b = kbuild.bootable(entry)
        if b is None:
            continue
        if spec.host.switch == "reboot":
            raise UsageError(
                f"kernel {b.label}: host.switch: reboot boots packaged kernels only (a GRUB "
                "entry); use kexec for built kernels"
            )
        lacks = b.lacks(MACHINE_NEEDS)
        if lacks:
            raise UsageError(
                f"kernel {b.label}: config lacks {', '.join(lacks)}: a lab machine could not "
                "be reached on it over SSH or switched back (add them to config.fragment)"
            )


def label_matches(release: str, label: str) -> bool:
    """Does a Debian kernel label name this release (6.12 -> 6.12.57+deb13-cloud-amd64)?"""
    return release == label or release.startswith((f"{label}.", f"{label}-", f"{label}+"))


def release_for(t: inv.SshTransport, label: str) -> str:
    """The installed kernel a label names: the one release in /boot that is the label or
    starts with it followed by '.', '-' or '+' (6.12 -> 6.12.57+deb13-cloud-amd64).
    HostError naming the machine and the candidates when none or several match."""
    names = t.run(["ls", "-1", "/boot"]).split()
    releases = sorted(n.removeprefix("vmlinuz-") for n in names if n.startswith("vmlinuz-"))
    hits = [r for r in releases if label_matches(r, label)]
    if len(hits) != 1:
        what = "no installed kernel" if not hits else f"{len(hits)} installed kernels"
        raise HostError(
            f"{t.name}: kernels: {what} for label {label} "
            f"(/boot has {', '.join(releases) or 'none'}; install its package there, "
            "or give it as deb:, build: or source:)"
        )
    return hits[0]


class InventoryHost(AgentHost):
    kind: HostKind = "inventory"

    def __init__(self, machine: inv.Machine, spec: Spec, run_id: str, known_hosts: Path):
        super().__init__(run_id)
        self.machine = machine
        self.spec = spec
        self.accel = "machine"
        self.label = f"machine {machine.name}"
        self.known_hosts = known_hosts
        self.ssh: inv.SshTransport | None = None
        self.first_release: str | None = None  # what it ran before this run
        self.release: str | None = None  # what it runs now
        self.kernels_run: dict[str, int] = {}  # label -> trials run here
        self.hardware: dict[str, object] = {}
        self.hold: inv.MachineHold | None = None
        self.releases: dict[str, str] | None = None  # label -> release of kernels we copied

    def connect(self) -> inv.SshTransport:
        if self.ssh is None:
            self.ssh = inv.SshTransport(self.machine, self.known_hosts)
            self.release = self.first_release = self.ssh.run(["uname", "-r"]).strip()
            self.hold = inv.MachineHold(self.ssh, self.run_id)
        return self.ssh

    def claim(self) -> list[str]:
        """Hold the machine for this run (the agent shipped first: `hold` is its command),
        then sweep what killed runs left there (a killed attempt of this run too, on
        --resume: their KSM knobs must be back before ours save the machine's). HostBusy
        when another run holds it. Returns what the sweep removed."""
        t = self.take_hold()
        _, removed, errors = inv.sweep_run_state(t, holder=self.run_id)
        if errors:
            raise HostError(f"{self.machine.name}: clean before the run: {'; '.join(errors)}")
        if self.releases is None:
            self.releases = self.install_kernels(t)
        return removed

    def take_hold(self) -> inv.SshTransport:
        """The agent shipped (the kernel's tmpfs may have lost it) and the hold taken."""
        t = self.connect()
        inv.ship_agent(t)
        assert self.hold is not None
        self.hold.take()
        return t

    def install_kernels(self, t: inv.SshTransport) -> dict[str, str]:
        """The spec's kernels that no package brings (built from source, a built tree, a
        bindeb-pkg .deb unpacked), copied into the machine's /boot for this run and
        removed at its end. Debian kernels by label must be installed already."""
        releases = {}
        for entry in self.spec.kernels:
            b = kbuild.bootable(entry)
            if b is not None:
                inv.install_boot_files(t, self.run_id, b.release, b.vmlinuz, b.initrd)
                releases[b.label] = b.release
        return releases

    def open(self, kernel: str, stack: ExitStack, trial_dir: Path) -> list[tuple[str, str]]:
        self.reset()
        t = self.connect()
        self.t = t
        if self.hold is None or not self.hold.held:
            self.claim()
        release = (self.releases or {}).get(kernel) or release_for(t, kernel)
        notes = []
        if release != self.release:
            was = self.release
            seconds = inv.switch_kernel(
                t, release, self.spec.host.switch, self.spec.host.switch_timeout_s
            )
            self.release = release
            notes.append(
                (
                    "kernel-switch",
                    f"{self.machine.name}: {self.spec.host.switch} {was} -> {release} "
                    f"in {seconds:.1f} s",
                )
            )
            # The old kernel took the hold's session with it. No sweep again: only what
            # is on disk survives a switch, and the first claim swept that.
            self.take_hold()
        notes.append(("machine", f"{self.machine.name} runs {release}"))
        self.kernels_run[kernel] = self.kernels_run.get(kernel, 0) + 1
        # The trial's own folder: a machine serves many trials, and `clean` finds ours.
        self.work = f"{WORK}/{self.tag}/{trial_dir.name}"
        t.run(["/bin/mkdir", "-p", self.work])
        stack.callback(t.run, ["/bin/rm", "-rf", self.work])
        return notes

    def runs_now(self, label: str) -> bool:
        """Is the machine on this kernel already (its next trial of it needs no switch)?"""
        if self.release is None:
            return False
        copied = (self.releases or {}).get(label)
        return self.release == copied if copied else label_matches(self.release, label)

    def record(self) -> dict[str, object]:
        """The machine as the manifest keeps it: where, what hardware, what it ran."""
        t = self.connect()
        if not self.hardware:
            cpuinfo = t.read("/proc/cpuinfo").decode(errors="replace")
            meminfo = t.read("/proc/meminfo").decode(errors="replace")
            mem_kib = next(
                (int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal:")), 0
            )
            self.hardware = {
                "cpu_model": cpu_model(cpuinfo),
                "cpus": cpuinfo.count("processor\t:"),
                "mem_total_mib": mem_kib // 1024,
                "firmware": "uefi" if self.exists("/sys/firmware/efi") else "bios",
            }
        return {
            "address": f"{self.machine.address}:{self.machine.port}",
            **self.hardware,
            "release_before": self.first_release,
            "kernels_run": dict(self.kernels_run),
            "facts": self._facts,
        }

    def exists(self, path: str) -> bool:
        try:
            self.connect().run(["/usr/bin/test", "-e", path], 30)
            return True
        except HostError:
            return False

    def alive(self) -> bool:
        """Does the machine still answer (after a failed trial: its fault or the trial's?)."""
        try:
            inv.wait_reachable(self.connect(), 30)
            return True
        except HostError:
            return False

    def close(self) -> list[str]:
        """Back to the kernel the machine ran before the run (its default boot entry was
        never changed); returns what was done, for the run's events."""
        done: list[str] = []
        if self.ssh is None:
            return done
        try:
            if self.first_release and self.release != self.first_release:
                s = inv.switch_kernel(
                    self.ssh,
                    self.first_release,
                    self.spec.host.switch,
                    self.spec.host.switch_timeout_s,
                )
                done.append(f"{self.machine.name}: back on {self.first_release} in {s:.1f} s")
            self.ssh.run(["/bin/rm", "-rf", f"{WORK}/{self.tag}"])
            removed = inv.remove_installed(self.ssh, run_id=self.run_id)
            if removed:
                done.append(f"{self.machine.name}: removed {', '.join(removed)}")
        finally:
            if self.hold is not None:
                self.hold.release()
            self.ssh.close()
            self.ssh = None
        return done
