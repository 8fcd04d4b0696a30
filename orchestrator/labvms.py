"""Lab-host VMs that stand in for real lab machines: an inventory on loopback ports.

`start(DIR)` boots N lab hosts from the lab image (libvirt, TCG), each with a user-mode
NIC whose port 22 is forwarded to a free 127.0.0.1 port, makes a key pair for them (in
DIR, never the user's), puts its public half in each VM's /root/.ssh/authorized_keys
through the guest agent, waits for SSH and writes DIR/inventory.ini. `stop(DIR)`
removes every domain and overlay tagged with the run id recorded in DIR/state.json.
Used by the system tests and by `densitylab lab vms start|stop DIR` (`make lab-vms`).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import fleet, labimage, proc
from orchestrator.errors import DensitylabError, HostError, UsageError
from orchestrator.inventory import Machine, SshTransport, wait_reachable

log = logging.getLogger(__name__)

STATE = "state.json"
INVENTORY = "inventory.ini"
KEY = "id_ed25519"
GROUP = "lab"


@dataclass(frozen=True)
class LabVms:
    """What start() booted; stop() needs only the run id."""

    run_id: str
    names: tuple[str, ...]
    ports: tuple[int, ...]
    kernel: str
    inventory: str
    boot_s: float  # start of the domains to SSH answering on every VM


def free_port() -> int:
    """A loopback port free right now (the kernel picks it; QEMU binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(directory: Path) -> Path:
    """A fresh ed25519 key pair for these VMs only; returns the private key's path."""
    key = directory / KEY
    for p in (key, key.with_suffix(".pub")):
        p.unlink(missing_ok=True)
    proc.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "densitylab-lab-vms", "-f", str(key)]
    )
    return key


def write_inventory(
    directory: Path, names: tuple[str, ...], ports: tuple[int, ...], key: Path
) -> Path:
    lines = [f"[{GROUP}]"]
    lines += [
        f"{n} ansible_host=127.0.0.1 ansible_port={p}" for n, p in zip(names, ports, strict=True)
    ]
    lines += ["", f"[{GROUP}:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={key}", ""]
    path = directory / INVENTORY
    path.write_text("\n".join(lines))
    return path


def guest_specs(
    directory: Path, run_id: str, count: int, kernel: str, memory_mib: int
) -> list[fleet.GuestSpec]:
    image = labimage.find_lab_image()
    k = image.kernel(kernel)
    specs = []
    for i in range(count):
        name = f"dl-{run_id}-vm{i}"
        specs.append(
            fleet.GuestSpec(
                name=name,
                memory_mib=memory_mib,
                vcpus=2,
                image=fleet.GuestImage(
                    kernel=k.vmlinuz, initrd=k.initrd, disk=image.rootfs, cmdline=image.cmdline
                ),
                console_log=directory / "console" / f"vm{i}.log",
                overlay=fleet.OVERLAY_ROOT / run_id / f"{name}.qcow2",
                numa_cells=2,
                ssh_port=free_port(),
            )
        )
    return specs


def authorize(fl: fleet.Fleet, name: str, public_key: bytes) -> None:
    """The test key as root's only authorized key (through the guest agent, not SSH)."""
    r = fl.guest_exec(name, ["/bin/mkdir", "-p", "-m", "700", "/root/.ssh"])
    if r.rc != 0:
        raise HostError(f"{name}: mkdir /root/.ssh: {r.stderr.strip()}")
    fl.write_file(name, "/root/.ssh/authorized_keys", public_key, 0o600)


def start(
    directory: Path,
    count: int = 2,
    kernel: str = "6.12",
    memory_mib: int = 2048,
    timeout_s: float = 300,
) -> LabVms:
    """Boot count lab VMs and return them; DIR/inventory.ini reaches them as group `lab`.
    On any failure everything started is removed again. Raises UsageError (DIR already
    holds running VMs), HostError, GuestError."""
    directory = directory.resolve()
    if (directory / STATE).exists():
        raise UsageError(f"{directory / STATE}: lab VMs already started here (stop them first)")
    directory.mkdir(parents=True, exist_ok=True)
    run_id = f"labvms-{secrets.token_hex(3)}"
    key = make_key(directory)
    specs = guest_specs(directory, run_id, count, kernel, memory_mib)
    conn = fleet.connect()
    fl = fleet.Fleet(conn, run_id, "lab-vms", "qemu")
    t0_ns = time.monotonic_ns()
    try:
        fl.define(specs)
        fl.start_all()
        fl.wait_ready(timeout_s)
        for s in specs:
            authorize(fl, s.name, key.with_suffix(".pub").read_bytes())
        names = tuple(f"vm{i}" for i in range(count))
        ports = tuple(s.ssh_port or 0 for s in specs)
        inventory = write_inventory(directory, names, ports, key)
        for n, p in zip(names, ports, strict=True):
            with SshTransport(Machine(n, "127.0.0.1", p, "root", key)) as t:
                wait_reachable(t, timeout_s)
    except BaseException:
        errors = fl.teardown()
        for e in errors:
            log.error("lab VMs teardown: %s", e)
        conn.close()
        raise
    boot_s = (time.monotonic_ns() - t0_ns) / 1e9
    vms = LabVms(
        run_id, tuple(s.name for s in specs), ports, kernel, str(inventory), round(boot_s, 2)
    )
    (directory / STATE).write_text(json.dumps(asdict(vms), indent=2) + "\n")
    fl.guests.clear()  # they outlive this process; stop() removes them by their run id
    conn.close()
    return vms


def stop(directory: Path) -> list[str]:
    """Remove the VMs started in DIR (by run id tag) and forget them; returns what was
    removed. Raises UsageError when DIR has no state, DensitylabError on teardown errors."""
    state = directory.resolve() / STATE
    try:
        run_id = str(json.loads(state.read_text())["run_id"])
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{state}: no lab VMs recorded here") from e
    conn = fleet.connect()
    try:
        removed, errors = fleet.clean_domains(conn, [run_id])
    finally:
        conn.close()
    if errors:
        raise DensitylabError("lab VMs stop: " + "; ".join(errors))
    state.unlink()
    return removed
