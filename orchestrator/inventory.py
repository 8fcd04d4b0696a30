"""Real lab machines from an Ansible inventory: the one module that speaks SSH.

A machine is named by the user's own inventory (INI or YAML), read with Ansible's own
parser (`ansible-inventory --list`, `ansible PATTERN --list-hosts`), so groups, ranges,
group_vars and patterns mean what they mean to Ansible. Each machine is then driven
through `SshTransport`, which has the surface of a lab-host VM's channel (`run`, `read`,
`write`, `close`): every step is a host-agent subcommand, the same on both.

SSH is OpenSSH with one ControlMaster per machine in a private directory (a command
costs one round trip, not a key exchange), BatchMode (never a prompt), no user config
(`-F /dev/null`), and host keys recorded in a known_hosts file of the run
(accept-new: the first contact records the key, every later one must match it; the
user's ~/.ssh/known_hosts is neither read nor written).

Kernels: `install_kernels` installs Debian packages by name or copied .deb files and
records what this run added (on the machine, so `sweep` finds it after a kill -9);
`switch_kernel` boots an installed kernel by kexec (default) or by a reboot into a
one-time GRUB entry (the default entry is never changed).
"""

from __future__ import annotations

import base64
import getpass
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator import agentship, proc
from orchestrator.errors import CommandError, HostBusy, HostError, UsageError, shown

log = logging.getLogger(__name__)

# What a lab machine needs (`densitylab lab prepare` installs it; the lab-host image
# carries it, so the VMs that stand in for lab machines need no network).
LAB_PACKAGES = (
    "python3",  # the host agent
    "python3-apt",  # Ansible's apt module
    "numactl",
    "kexec-tools",
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon-system",
    "libvirt-clients",
)
AGENT_PATH = agentship.REMOTE_AGENT_PATH  # the host agent as one file (a zipapp)
DLFILL_PATH = "/usr/local/bin/dlfill"
STATE_DIR = "/var/lib/densitylab"
INSTALLED_RECORD = f"{STATE_DIR}/installed-packages.json"
DEB_DIR = "/var/tmp/densitylab/debs"
# ansible(-inventory) are the venv's, next to this interpreter.
VENV_BIN = Path(sys.executable).parent
INVENTORY_TIMEOUT_S = 60
SSH_CONNECT_TIMEOUT_S = 10
STDERR_TAIL = 300
SwitchMethod = Literal["kexec", "reboot"]


class InventoryError(UsageError):
    """The inventory cannot be read or the pattern names no machine (exit 2)."""


class RemoteError(HostError):
    """A command on a machine exited non-zero."""

    def __init__(self, machine: str, argv: Sequence[str], rc: int | None, stderr_tail: str):
        self.machine = machine
        self.argv = list(argv)
        self.rc = rc
        self.stderr_tail = stderr_tail
        what = "timed out" if rc is None else f"exited {rc}"
        super().__init__(f"{machine}: {shlex.join(argv)} {what}: {stderr_tail.strip()}")


class Unreachable(HostError):
    """SSH itself failed (rc 255): the machine is down, refuses us, or its key changed."""

    def __init__(self, machine: str, reason: str):
        self.machine = machine
        self.reason = reason
        super().__init__(f"{machine}: unreachable: {reason}")


class KernelSwitchError(HostError):
    """A machine did not come back on the kernel asked for."""

    def __init__(self, machine: str, release: str, reason: str):
        self.machine = machine
        self.release = release
        self.reason = reason
        super().__init__(f"{machine}: switch to {release}: {reason}")


@dataclass(frozen=True)
class Machine:
    """One inventory host as SSH reaches it."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    private_key: Path | None = None
    become: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} ({self.user}@{self.address}:{self.port})"


# ---------------------------------------------------------------- the inventory


def ansible_env() -> dict[str, str]:
    """Ansible with the venv's binaries first, no colour, failing on a file it cannot
    parse (its default is a warning and an empty inventory)."""
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
        "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True",
    }


def _ansible(argv: list[str], path: Path) -> str:
    try:
        return proc.run(argv, timeout_s=INVENTORY_TIMEOUT_S, env=ansible_env()).stdout
    except CommandError as e:
        lines = [ln.strip() for ln in e.stderr_tail.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"{argv[0]} exited {e.rc}"
        raise InventoryError(f"{path}: not a readable inventory: {why}") from e


def load_inventory(path: Path, pattern: str = "all") -> list[Machine]:
    """The machines of `pattern` (an Ansible host pattern) in the inventory at path.

    Raises InventoryError (no such file, unparsable, or the pattern matches nothing)."""
    if not path.is_file():
        raise InventoryError(f"{path}: no such inventory file")
    listing = json.loads(
        _ansible([str(VENV_BIN / "ansible-inventory"), "-i", str(path), "--list"], path)
    )
    names = matching_hosts(path, pattern)
    if not names:
        raise InventoryError(f"{path}: pattern {shown(pattern)} matches no host")
    hostvars = listing.get("_meta", {}).get("hostvars", {})
    return [machine_of(n, hostvars.get(n, {}), path) for n in names]


def matching_hosts(path: Path, pattern: str) -> list[str]:
    """Host names of an Ansible pattern, in inventory order, by Ansible's own matching."""
    argv = [str(VENV_BIN / "ansible"), "-i", str(path), "--list-hosts", "--", pattern]
    try:
        text = proc.run(argv, timeout_s=INVENTORY_TIMEOUT_S, env=ansible_env()).stdout
    except CommandError as e:
        if "No hosts matched" in e.stderr_tail or "Could not match supplied host" in e.stderr_tail:
            return []
        raise InventoryError(f"{path}: pattern {shown(pattern)}: {e.stderr_tail.strip()}") from e
    # "  hosts (2):\n    a\n    b"
    return [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]


def machine_of(name: str, hv: dict[str, Any], inventory: Path) -> Machine:
    """A Machine from Ansible's host variables; a relative key path is relative to the
    inventory file (as a user reading the file would expect)."""
    key = hv.get("ansible_ssh_private_key_file") or hv.get("ansible_private_key_file")
    key_path = None
    if key:
        key_path = Path(os.path.expanduser(str(key)))
        if not key_path.is_absolute():
            key_path = (inventory.parent / key_path).resolve()
    try:
        port = int(hv.get("ansible_port") or hv.get("ansible_ssh_port") or 22)
    except (TypeError, ValueError) as e:
        raise InventoryError(
            f"{inventory}: {name}: ansible_port: {shown(hv.get('ansible_port'))}"
        ) from e
    # as Ansible: without ansible_user, the local user name
    user = str(hv.get("ansible_user") or hv.get("ansible_ssh_user") or getpass.getuser())
    become = str(hv.get("ansible_become", False)).lower() in ("true", "yes", "1")
    address = str(hv.get("ansible_host") or hv.get("ansible_ssh_host") or name)
    return Machine(name, address, port, user, key_path, become and user != "root")


def inventory_yaml(machines: Sequence[Machine]) -> dict[str, Any]:
    """The machines as an inventory for ansible-runner: exactly what SshTransport uses
    (absolute key paths, no relative-path surprises under the runner's cwd)."""
    hosts: dict[str, Any] = {}
    for m in machines:
        hv: dict[str, Any] = {
            "ansible_host": m.address,
            "ansible_port": m.port,
            "ansible_user": m.user,
        }
        if m.private_key is not None:
            hv["ansible_ssh_private_key_file"] = str(m.private_key)
        if m.become:
            hv["ansible_become"] = True
        hosts[m.name] = hv
    return {"all": {"hosts": hosts}}


# ---------------------------------------------------------------- SSH


def ssh_options(m: Machine, control_dir: Path, known_hosts: Path) -> list[str]:
    """Every option, explicitly: nothing comes from ~/.ssh/config or the user's known_hosts."""
    opts = {
        "BatchMode": "yes",
        "UserKnownHostsFile": str(known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "accept-new",
        "ControlMaster": "auto",
        # %C: a hash of host, port and user, short enough for a socket path
        "ControlPath": str(control_dir / "%C"),
        # A master that outlives a killed run exits by itself after this idle time.
        "ControlPersist": "300",
        "ConnectTimeout": str(SSH_CONNECT_TIMEOUT_S),
        # A machine that went away (kexec, crash) is noticed in ~15 s, not at TCP timeout.
        "ServerAliveInterval": "5",
        "ServerAliveCountMax": "3",
        "LogLevel": "ERROR",
    }
    if m.private_key is not None:
        opts |= {
            "IdentityFile": str(m.private_key),
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
        }
    args = ["-F", "/dev/null", "-p", str(m.port), "-l", m.user]
    for k, v in opts.items():
        args += ["-o", f"{k}={v}"]
    return args


def ansible_ssh_env(control_dir: Path, known_hosts: Path) -> dict[str, str]:
    """Ansible's ssh connection with SshTransport's choices: no user config, the run's
    known_hosts, BatchMode, its masters in control_dir (stop_masters ends them)."""
    args = [
        "-F", "/dev/null", "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=accept-new", "-o", "ControlMaster=auto",
        "-o", "ControlPersist=60", "-o", f"ControlPath={control_dir}/%C",
        "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    return {"ANSIBLE_SSH_ARGS": shlex.join(args), "ANSIBLE_PIPELINING": "True"}


def stop_masters(control_dir: Path) -> None:
    """Ask every master socket in control_dir to exit (ssh -O exit), then remove it."""
    if not control_dir.is_dir():
        return
    for sock in control_dir.iterdir():
        if sock.is_socket():
            argv = ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "_"]
            proc.run(argv, timeout_s=10, check=False)
            sock.unlink(missing_ok=True)


class SshTransport:
    """Commands and files on one machine over SSH; the surface of a lab host's channel.

    known_hosts: the run's file (created if missing); without one, a private file that
    lives as long as this transport. Use close() (or `with`) to stop the master."""

    def __init__(self, machine: Machine, known_hosts: Path | None = None):
        self.machine = machine
        self.name = machine.name
        self._dir = Path(tempfile.mkdtemp(prefix="dl-ssh-"))  # mode 0700
        self.known_hosts = known_hosts or self._dir / "known_hosts"
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        self.known_hosts.touch(mode=0o600, exist_ok=True)
        self._opts = ssh_options(machine, self._dir, self.known_hosts)

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ssh_argv(self, remote: Sequence[str]) -> list[str]:
        """The ssh command running remote (argv) on the machine; with sudo if it needs it."""
        cmd = ["sudo", "-n", "--", *remote] if self.machine.become else list(remote)
        return ["ssh", *self._opts, self.machine.address, "--", shlex.join(cmd)]

    def _ssh(self, argv: Sequence[str], timeout_s: float, input_text: str | None = None) -> str:
        try:
            return proc.run(self.ssh_argv(argv), timeout_s=timeout_s, input_text=input_text).stdout
        except CommandError as e:
            tail = e.stderr_tail.strip()[-STDERR_TAIL:]
            if e.rc == 255:  # ssh's own failure (a remote command exiting 255 looks alike)
                raise Unreachable(self.name, tail or "ssh exited 255") from e
            raise RemoteError(self.name, argv, e.rc, tail) from e

    def run(self, argv: list[str], timeout_s: float = 120) -> str:
        """Run argv on the machine, return its stdout. Raises RemoteError (rc != 0 or
        timeout, with argv, rc and the stderr tail) or Unreachable."""
        return self._ssh(argv, timeout_s)

    def agent(self, *args: str, timeout_s: float = 120) -> str:
        return self.run(["/usr/bin/python3", AGENT_PATH, *args], timeout_s)

    def read(self, path: str, timeout_s: float = 120) -> bytes:
        """The bytes of a file on the machine (base64 on the wire: ssh's pipe is text here)."""
        return base64.b64decode(self._ssh(["base64", "-w0", "--", path], timeout_s))

    def write(self, path: str, data: bytes, mode: int = 0o644, timeout_s: float = 120) -> None:
        """Write a file atomically (temp file in the same folder, then rename)."""
        script = (
            'set -e; mkdir -p "$(dirname "$1")"; t=$(mktemp "$1.dl-XXXXXX"); '
            'base64 -d > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"'
        )
        argv = ["sh", "-c", script, "sh", path, oct(mode)[2:]]
        self._ssh(argv, timeout_s, input_text=base64.b64encode(data).decode())

    def disconnect(self) -> None:
        """Stop the master connection (the next command opens a new one). After a kexec
        the old master hangs on a dead TCP connection; this drops it at once."""
        stop_masters(self._dir)

    def close(self) -> None:
        """Stop the master and remove the private folder (and its known_hosts, if ours)."""
        try:
            self.disconnect()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def wait_reachable(t: SshTransport, timeout_s: float, *, not_boot_id: str | None = None) -> str:
    """Poll until the machine answers over SSH (and, with not_boot_id, has booted since);
    returns its boot id. Raises Unreachable with the last reason at the deadline."""
    deadline = time.monotonic() + timeout_s
    reason = "no answer"
    while time.monotonic() < deadline:
        try:
            boot_id = t.run(["cat", "/proc/sys/kernel/random/boot_id"], timeout_s=20).strip()
            if boot_id != not_boot_id:
                return boot_id
            reason = "still running the old kernel"
        except HostError as e:
            reason = str(e)
            t.disconnect()
        time.sleep(1)
    raise Unreachable(t.name, f"not back within {timeout_s:.0f}s: {reason}")


def ship_agent(t: SshTransport) -> None:
    """Put the host agent and dlfill on the machine."""
    for dest, (src, mode) in agent_files().items():
        t.write(dest, src.read_bytes(), mode)


def agent_files() -> dict[str, tuple[Path, int]]:
    """Remote path -> (local file, mode) of what a machine gets (ship_agent, and the
    prepare play): the agent's zipapp and the static workload program."""
    from orchestrator import images

    return {
        AGENT_PATH: (agentship.agent_zipapp(), 0o644),
        DLFILL_PATH: (images.host_dlfill(), 0o755),
    }


# ---------------------------------------------------------------- kernels


class MachineHold:
    """This run's claim on a machine: the agent's `hold` kept running over its own SSH
    session. The lock on the machine lives as long as that session, so a killed run
    frees the machine by itself, and another run (or `clean --inventory`) sees who
    has it. A kernel switch ends the session; take() again once the machine is back."""

    def __init__(self, t: SshTransport, run_id: str):
        self.t = t
        self.run_id = run_id
        self.session: proc.Popen[bytes] | None = None  # while held

    def take(self, timeout_s: float = 60) -> None:
        """Raises HostBusy naming the run that has the machine, or Unreachable."""
        self.release()
        argv = ["/usr/bin/python3", AGENT_PATH, "hold", "--run-id", self.run_id]
        argv += ["--controller", f"{os.uname().nodename} pid {os.getpid()}"]
        session = proc.start_session(self.t.ssh_argv(argv))
        line = proc.first_line(session, timeout_s)
        try:
            answer = json.loads(line or b"{}")
        except ValueError:
            answer = {}
        if answer.get("held") == self.run_id:
            self.session = session
            return
        proc.end_session(session)
        if "busy" in answer:
            held = answer["busy"]
            raise HostBusy(
                self.run_id,
                f"run {held.get('run_id', '?')} (from {held.get('controller', '?')})",
                f"{self.t.name} is held by another run",
            )
        raise Unreachable(self.t.name, f"hold: no answer in {timeout_s:.0f} s")

    @property
    def held(self) -> bool:
        return self.session is not None and self.session.poll() is None

    def release(self) -> None:
        """Close the session's stdin: the agent lets go and exits."""
        if self.session is not None:
            session, self.session = self.session, None
            proc.end_session(session)


def kexec_cmdline(proc_cmdline: str) -> str:
    """The running kernel's command line for the next kernel, without the tokens the
    boot loader added (BOOT_IMAGE, initrd=): kexec passes its own initrd."""
    keep = [w for w in proc_cmdline.split() if not w.startswith(("BOOT_IMAGE=", "initrd="))]
    return " ".join(keep)


def boot_files(t: SshTransport, release: str) -> tuple[str, str | None]:
    """(vmlinuz, initrd or None) of an installed kernel; HostError when it is not installed."""
    names = t.run(["ls", "-1", "/boot"]).split()
    if f"vmlinuz-{release}" not in names:
        have = sorted(n.removeprefix("vmlinuz-") for n in names if n.startswith("vmlinuz-"))
        raise KernelSwitchError(
            t.name, release, f"not installed (/boot has {', '.join(have) or 'none'})"
        )
    initrd = f"initrd.img-{release}"
    return f"/boot/vmlinuz-{release}", f"/boot/{initrd}" if initrd in names else None


def kexec_argv(vmlinuz: str, initrd: str | None, cmdline: str) -> list[str]:
    return [
        "kexec",
        "-l",
        vmlinuz,
        *([f"--initrd={initrd}"] if initrd else []),
        f"--command-line={cmdline}",
    ]


def uses_systemd(t: SshTransport) -> bool:
    return t.run(["cat", "/proc/1/comm"]).strip() == "systemd"


def detach(t: SshTransport, command: str) -> None:
    """Run command a second after this SSH call returns. Its stdio goes to /dev/null:
    a detached child holding the session's pipes would keep the call open until the old
    kernel dies, and the switch would be timed from then."""
    later = shlex.quote(f"sleep 1; {command}")
    t.run(["sh", "-c", f"setsid -f sh -c {later} </dev/null >/dev/null 2>&1"])


def start_kexec(t: SshTransport, release: str) -> None:
    """Load the kernel and start it, detached: the SSH command returns before the old
    kernel goes. systemd machines stop their services first (`systemctl kexec`)."""
    vmlinuz, initrd = boot_files(t, release)
    cmdline = kexec_cmdline(t.run(["cat", "/proc/cmdline"]))
    t.run(kexec_argv(vmlinuz, initrd, cmdline))
    go = "systemctl kexec" if uses_systemd(t) else "sync; kexec -e"
    detach(t, go)


def grub_entry(grub_cfg: str, release: str) -> str:
    """The grub-reboot argument booting release once: 'SUBMENU_ID>ENTRY_ID' of Debian's
    'Advanced options' submenu (ids are what grub-mkconfig writes as $menuentry_id_option)."""
    submenu = re.search(r"^submenu .*?\$menuentry_id_option '([^']+)'", grub_cfg, re.M)
    entry = re.search(
        rf"^\s*menuentry '[^']* {re.escape(release)}'.*?\$menuentry_id_option '([^']+)'",
        grub_cfg,
        re.M,
    )
    if entry is None:
        raise HostError(f"no GRUB menu entry for {release} in grub.cfg")
    return f"{submenu[1]}>{entry[1]}" if submenu else entry[1]


def start_reboot(t: SshTransport, release: str) -> None:
    """Reboot once into release: grub-reboot sets next_entry in grubenv, which GRUB
    clears on that boot; the saved default is never touched."""
    boot_files(t, release)
    entry = grub_entry(t.read("/boot/grub/grub.cfg").decode(errors="replace"), release)
    t.run(["grub-reboot", entry])
    go = "systemctl reboot" if uses_systemd(t) else "sync; reboot -f"
    detach(t, go)


def switch_kernel(
    t: SshTransport, release: str, method: SwitchMethod = "kexec", timeout_s: float = 300
) -> float:
    """Boot the machine into an installed kernel; returns the seconds from the switch
    command to SSH answering on the new boot. A machine already on release is left
    alone (0.0). Raises KernelSwitchError (not installed, not back in time, another
    kernel came up)."""
    if t.run(["uname", "-r"]).strip() == release:
        return 0.0
    old_boot = t.run(["cat", "/proc/sys/kernel/random/boot_id"]).strip()
    (start_kexec if method == "kexec" else start_reboot)(t, release)
    t0_ns = time.monotonic_ns()
    t.disconnect()
    try:
        wait_reachable(t, timeout_s, not_boot_id=old_boot)
    except Unreachable as e:
        raise KernelSwitchError(t.name, release, f"{method}: {e.reason}") from e
    switch_s = (time.monotonic_ns() - t0_ns) / 1e9
    running = t.run(["uname", "-r"]).strip()
    if running != release:
        raise KernelSwitchError(t.name, release, f"{method}: came back on {running}")
    log.info("%s: %s to %s in %.1f s", t.name, method, release, switch_s)
    return switch_s


@dataclass(frozen=True)
class InstallRecord:
    """What this run installed on one machine (nothing that was there before)."""

    machine: str
    run_id: str
    packages: tuple[str, ...]
    files: tuple[str, ...] = ()  # kernels copied into /boot (built ones: no package)


def installed_packages(t: SshTransport) -> set[str]:
    out = t.run(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\n"])
    return {
        name
        for name, _, st in (ln.partition("\t") for ln in out.splitlines())
        if st.startswith("ii")
    }


def install_kernels(
    t: SshTransport,
    run_id: str,
    packages: Sequence[str] = (),
    debs: Sequence[Path] = (),
    timeout_s: float = 900,
) -> InstallRecord:
    """apt-get install packages by name and .deb files copied over; record on the
    machine which packages are new (appended to what earlier runs recorded).
    Raises RemoteError when apt fails (the record is written first, so `sweep` still
    removes what a half-done install brought)."""
    before = installed_packages(t)
    remote_debs = []
    for deb in debs:
        dest = f"{DEB_DIR}/{deb.name}"
        t.write(dest, deb.read_bytes(), 0o644)
        remote_debs.append(dest)
    argv = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
            "--no-install-recommends", *packages, *remote_debs]  # fmt: skip
    try:
        if packages or remote_debs:
            t.run(argv, timeout_s=timeout_s)
    finally:
        new = tuple(sorted(installed_packages(t) - before))
        record = InstallRecord(t.name, run_id, new)
        if new:
            _append_record(t, record)
        if remote_debs:
            t.run(["rm", "-rf", DEB_DIR])
    return record


def install_boot_files(
    t: SshTransport, run_id: str, release: str, vmlinuz: Path, initrd: Path | None
) -> InstallRecord:
    """Copy a kernel with no package (built from source, or unpacked from a .deb) into
    /boot as vmlinuz-RELEASE (+ initrd.img-RELEASE), where kexec and release lookups
    find it; recorded first so `sweep` removes what a killed copy left. A release the
    machine has already is left as it is, and not recorded."""
    dest = {f"/boot/vmlinuz-{release}": vmlinuz}
    if initrd is not None:
        dest[f"/boot/initrd.img-{release}"] = initrd
    have = set(t.run(["ls", "-1", "/boot"]).split())
    if f"vmlinuz-{release}" in have:
        return InstallRecord(t.name, run_id, ())
    record = InstallRecord(t.name, run_id, (), tuple(dest))
    _append_record(t, record)
    for path, src in dest.items():
        t.write(path, src.read_bytes(), 0o644)
    return record


def recorded(t: SshTransport) -> list[InstallRecord]:
    try:
        data = json.loads(t.read(INSTALLED_RECORD) or b"[]")
    except RemoteError:  # no record: nothing was installed by densitylab
        return []
    return [
        InstallRecord(r["machine"], r["run_id"], tuple(r["packages"]), tuple(r.get("files", ())))
        for r in data
    ]


def _append_record(t: SshTransport, record: InstallRecord) -> None:
    records = [*recorded(t), record]
    blob = json.dumps([r.__dict__ for r in records], indent=1, default=list).encode()
    t.write(INSTALLED_RECORD, blob, 0o644)


def remove_installed(
    t: SshTransport, run_id: str | None = None, spare: str | None = None
) -> list[str]:
    """Purge what densitylab installed (one run's, or every run's but spare's: the live
    holder's), never the running kernel's packages or files; returns what was removed.
    Raises RemoteError from apt."""
    records = recorded(t)
    mine = [r for r in records if (run_id is None or r.run_id == run_id) and r.run_id != spare]
    running = t.run(["uname", "-r"]).strip()
    doomed = sorted({p for r in mine for p in r.packages if running not in p})
    present = installed_packages(t)
    doomed = [p for p in doomed if p in present]
    if doomed:
        t.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", *doomed],
              timeout_s=600)  # fmt: skip
    files = sorted({f for r in mine for f in r.files})
    busy = [f for f in files if running in f]  # the kernel it runs now (a killed run's)
    if len(busy) < len(files):
        t.run(["/bin/rm", "-f", "--", *[f for f in files if f not in busy]])
    doomed += [f for f in files if f not in busy]
    kept = [r for r in records if r not in mine]
    if busy:  # still recorded: the next clean, after a reboot, removes them
        kept.append(InstallRecord(t.name, "kept-running", (), tuple(busy)))
    blob = json.dumps([r.__dict__ for r in kept], indent=1, default=list).encode()
    t.write(INSTALLED_RECORD, blob, 0o644)
    return doomed


def sweep_run_state(
    t: SshTransport, holder: str | None = None
) -> tuple[str | None, list[str], list[str]]:
    """The agent's `clean` on the machine: what killed runs left there (processes,
    cgroups, probes, swap, KSM knobs, trial files), sparing the run that holds it; or,
    from the holder before its first trial (holder=its run id), everything, its own
    killed attempt's state included. Returns (live holder or None, removed, errors)."""
    ship_agent(t)  # `clean` is a command of this version's agent
    answer = json.loads(t.agent("clean", *(("--holder", holder) if holder else ()), timeout_s=300))
    return answer["kept_for"], list(answer["removed"]), list(answer["errors"])


def on_installed_kernel(t: SshTransport) -> str | None:
    """The run that installed the running kernel, when a killed run left the machine on
    one of its kernels (a reboot returns to the default entry, never changed)."""
    running = t.run(["uname", "-r"]).strip()
    return next((r.run_id for r in recorded(t) if any(running in p for p in r.packages)), None)


# ---------------------------------------------------------------- many machines


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0_ns = time.monotonic_ns()
    result = fn(*args)
    return result, (time.monotonic_ns() - t0_ns) / 1e9


def ssh_ms_per_call(t: SshTransport, calls: int = 10) -> float:
    """Mean wall time of `true` over the master connection, after one warm-up call."""
    t.run(["true"])
    _, total_s = timed(lambda: [t.run(["true"]) for _ in range(calls)])
    return total_s * 1000 / calls
