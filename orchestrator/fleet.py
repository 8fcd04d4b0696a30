"""The fleet: the only module that talks to libvirt.

Guests are defined from a template, tagged in libvirt <metadata> with the run id (so
`clean` can find them after a kill -9), started in parallel, and waited on through the
serial console marker and a guest-agent ping. Teardown destroys and undefines every
domain of the fleet and deletes its overlays, keeps going past errors, and reports them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import jinja2
import libvirt

from orchestrator.errors import DensitylabError, GuestError, HostError
from orchestrator.qemuparts import cell_cpus, create_overlay

log = logging.getLogger(__name__)

URI = "qemu:///system"
NS_URI = "https://densitylab.invalid/xmlns/guest/1"
NS_PREFIX = "dl"
OVERLAY_ROOT = Path("/var/lib/densitylab/overlays")
EMULATOR = "/usr/bin/qemu-system-x86_64"
BOOT_MARKER = "DENSITYLAB: boot ok"
READY_MARKER = "DENSITYLAB: ready"
PANIC_MARKER = "Kernel panic"
BOOT_RETRIES = 1  # per guest, after a panic before ready (see _retry_after_panic)
ERROR_MARKER = "DENSITYLAB: error"
GUEST_CMDLINE = "console=ttyS0 quiet panic=-1 no_timer_check"  # as images.CMDLINE
# Bytes per guest-file-write / guest-file-read call. A 1 MiB write (1.4 MB of base64 in
# one JSON message) made qemu-ga 7.2 stop answering; 64 KiB writes push dlfill in ~1 s.
AGENT_WRITE_CHUNK = 64 << 10
AGENT_READ_CHUNK = 256 << 10
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("orchestrator", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)

# libvirt prints every error to stderr by default; we raise them as exceptions instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass(frozen=True)
class GuestImage:
    """What a guest boots: a kernel (None: the disk's own bootloader), an initramfs,
    and optionally a disk to overlay. markers: its init prints the DENSITYLAB console
    markers; without them a guest is ready when its agent answers."""

    kernel: Path | None
    initrd: Path | None = None
    disk: Path | None = None
    cmdline: str = GUEST_CMDLINE
    markers: bool = True


@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory_mib: int
    vcpus: int
    image: GuestImage
    console_log: Path
    overlay: Path | None = None
    numa_cells: int = 1
    # A user-mode NIC (no route out: restrict=on) whose guest port 22 is forwarded to
    # 127.0.0.1:ssh_port, so the guest is reached like a lab machine (inventory.py).
    ssh_port: int | None = None


@dataclass
class Guest:
    """A started guest: its libvirt name, QEMU pid and timings (seconds since start)."""

    spec: GuestSpec
    pid: int | None = None
    started_ns: int = 0
    boot_s: float | None = None
    ready_s: float | None = None
    boot_retries: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def connect(uri: str = URI) -> libvirt.virConnect:
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HostError(
            f"cannot connect to {uri}: {e.get_error_message()} "
            "(start the lab daemons: make lab-start)"
        ) from e


def versions(conn: libvirt.virConnect) -> dict[str, str]:
    """libvirt and hypervisor (QEMU) versions as dotted strings."""

    def dotted(v: int) -> str:
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

    return {"libvirt": dotted(conn.getLibVersion()), "qemu": dotted(conn.getVersion())}


def domain_xml(spec: GuestSpec, *, run_id: str, trial_id: str, domain_type: str) -> str:
    """Render the domain XML for one guest; values are XML-escaped by the template."""
    return TEMPLATES.get_template("domain.xml.j2").render(
        domain_type=domain_type,
        name=spec.name,
        ns_uri=NS_URI,
        run_id=run_id,
        trial_id=trial_id,
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        kernel=spec.image.kernel,
        initrd=spec.image.initrd,
        cmdline=spec.image.cmdline,
        emulator=EMULATOR,
        overlay=spec.overlay,
        console_log=spec.console_log,
        numa_cells=spec.numa_cells,
        cell_cpus=cell_cpus(spec.vcpus, spec.numa_cells),
        ssh_port=spec.ssh_port,
    )


# The BPF verifier gives up with EAGAIN when a signal is pending in the loading thread;
# libvirtd starting several guests at once takes SIGCHLDs, so its device-cgroup program
# load fails now and then (seen once in a CI run: "failed to load cgroup BPF prog:
# Resource temporarily unavailable"). libbpf retries the same way.
TRANSIENT_START_ERRORS = ("failed to load cgroup BPF prog: Resource temporarily unavailable",)
START_ATTEMPTS = 4


def create_domain(dom: libvirt.virDomain, attempts: int = START_ATTEMPTS) -> None:
    """dom.create(), tried again on a transient libvirt failure; a failed create leaves
    the domain defined and shut off, so another try starts from the same state."""
    for attempt in range(1, attempts + 1):
        try:
            dom.create()
            return
        except libvirt.libvirtError as e:
            msg = e.get_error_message() or ""
            if attempt == attempts or not any(t in msg for t in TRANSIENT_START_ERRORS):
                raise
            log.warning("%s: start try %d: %s; trying again", dom.name(), attempt, msg)
            time.sleep(0.2 * attempt)


def qemu_pid(name: str) -> int | None:
    """The QEMU pid libvirt recorded for a running domain."""
    for d in (Path("/run/libvirt/qemu"), Path("/var/run/libvirt/qemu")):
        pidfile = d / f"{name}.pid"
        if pidfile.exists():
            with contextlib.suppress(ValueError):
                return int(pidfile.read_text().strip())
    return None


class Fleet:
    """Guests of one trial. Use as a context manager: leaving it tears everything down."""

    def __init__(self, conn: libvirt.virConnect, run_id: str, trial_id: str, domain_type: str):
        self.conn = conn
        self.run_id = run_id
        self.trial_id = trial_id
        self.domain_type = domain_type
        self.guests: list[Guest] = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = self.teardown()
        if errors and exc[0] is None:
            raise DensitylabError("fleet teardown: " + "; ".join(errors))
        for e in errors:
            log.error("fleet teardown: %s", e)

    def define(self, specs: Sequence[GuestSpec]) -> None:
        """Create overlays and define domains; each is tracked before the next is made."""
        for spec in specs:
            guest = Guest(spec)
            self.guests.append(guest)
            if spec.image.disk is not None and spec.overlay is not None:
                create_overlay(spec.image.disk, spec.overlay)
            spec.console_log.parent.mkdir(parents=True, exist_ok=True)
            xml = domain_xml(
                spec, run_id=self.run_id, trial_id=self.trial_id, domain_type=self.domain_type
            )
            try:
                self.conn.defineXML(xml)
            except libvirt.libvirtError as e:
                raise GuestError(spec.name, f"define failed: {e.get_error_message()}") from e

    def start_all(self, max_parallel: int = 8) -> None:
        """Start every defined guest, in parallel; raises GuestError for the first failure."""
        with ThreadPoolExecutor(max_workers=max_parallel) as pool:
            results = list(pool.map(self._start_one, self.guests))
        failed = [r for r in results if r is not None]
        if failed:
            raise failed[0]

    def _start_one(self, guest: Guest) -> GuestError | None:
        try:
            dom = self.conn.lookupByName(guest.name)
            guest.started_ns = time.monotonic_ns()
            create_domain(dom)
        except libvirt.libvirtError as e:
            return GuestError(guest.name, f"start failed: {e.get_error_message()}")
        guest.pid = qemu_pid(guest.name)
        return None

    def wait_ready(self, timeout_s: float) -> None:
        """Wait for every guest's ready marker and a guest-agent answer, with one deadline."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.guests)
        while pending:
            for guest in list(pending):
                if self._check_ready(guest):
                    pending.remove(guest)
            if not pending:
                return
            if time.monotonic() > deadline:
                g = pending[0]
                if not g.spec.image.markers:  # a user's image: the agent is the contract
                    raise GuestError(
                        g.name,
                        f"qemu-guest-agent did not answer within {timeout_s:.0f}s (the image "
                        "must run qemu-guest-agent on org.qemu.guest_agent.0)",
                    )
                raise GuestError(
                    g.name,
                    f"not ready after {timeout_s:.0f}s (console: {tail(g.spec.console_log)!r})",
                )
            time.sleep(0.1)

    def _check_ready(self, guest: Guest) -> bool:
        text = read_console(guest.spec.console_log)
        now_s = (time.monotonic_ns() - guest.started_ns) / 1e9
        if guest.boot_s is None and BOOT_MARKER in text:
            guest.boot_s = now_s
        if ERROR_MARKER in text:
            raise GuestError(guest.name, text[text.index(ERROR_MARKER) :].splitlines()[0])
        if not self._is_running(guest):
            if self._retry_after_panic(guest, text):
                return False
            raise GuestError(
                guest.name,
                f"domain stopped while booting (console: {tail(guest.spec.console_log)!r})",
            )
        markers = guest.spec.image.markers
        if (markers and READY_MARKER not in text) or not self.agent_ping(guest.name):
            return False
        guest.ready_s = now_s
        return True

    def _retry_after_panic(self, guest: Guest, text: str) -> bool:
        """Boot a guest whose kernel panicked before it was ready once more, from a fresh
        overlay. Under TCG a Debian kernel now and then panics in early boot (seen in CI:
        enqueue_timer while unpacking the initramfs, once in ~50 lab boots): an emulator
        flake, not the experiment's. The failed boot's console is kept beside the new one;
        a guest that panics again fails the trial."""
        if PANIC_MARKER not in text or READY_MARKER in text or guest.boot_retries >= BOOT_RETRIES:
            return False
        guest.boot_retries += 1
        log.warning("%s: kernel panic before ready; booting it once more", guest.name)
        console = guest.spec.console_log
        console.rename(console.with_name(f"{console.stem}.panic{guest.boot_retries}.log"))
        if guest.spec.image.disk is not None and guest.spec.overlay is not None:
            guest.spec.overlay.unlink(missing_ok=True)
            create_overlay(guest.spec.image.disk, guest.spec.overlay)
        guest.boot_s = None
        err = self._start_one(guest)
        if err is not None:
            raise err
        return True

    def _is_running(self, guest: Guest) -> bool:
        try:
            state, _ = self.conn.lookupByName(guest.name).state()
        except libvirt.libvirtError:
            return False
        return bool(state == libvirt.VIR_DOMAIN_RUNNING)

    def agent(self, name: str, command: dict[str, object], timeout_s: int = 10) -> object:
        """One guest-agent command; returns its `return` value. Raises GuestError."""
        import libvirt_qemu  # part of libvirt-python; only this module uses it

        try:
            dom = self.conn.lookupByName(name)
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), timeout_s, 0)
        except libvirt.libvirtError as e:
            raise GuestError(name, f"guest agent: {e.get_error_message()}") from e
        return json.loads(reply).get("return")

    def agent_ping(self, name: str) -> bool:
        try:
            self.agent(name, {"execute": "guest-ping"}, timeout_s=2)
        except GuestError:
            return False
        return True

    def guest_exec(self, name: str, argv: Sequence[str], timeout_s: float = 30) -> ExecResult:
        """Run argv in the guest through the agent and wait for it; output is captured."""
        started = self.agent(
            name,
            {
                "execute": "guest-exec",
                "arguments": {"path": argv[0], "arg": list(argv[1:]), "capture-output": True},
            },
        )
        pid = started["pid"] if isinstance(started, dict) else None
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.agent(name, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
            if isinstance(status, dict) and status.get("exited"):
                return ExecResult(
                    rc=int(status.get("exitcode", -1)),
                    stdout=b64text(status.get("out-data")),
                    stderr=b64text(status.get("err-data")),
                )
            if time.monotonic() > deadline:
                raise GuestError(name, f"{' '.join(argv)} did not exit within {timeout_s:.0f}s")
            time.sleep(0.05)

    def write_file(self, name: str, path: str, data: bytes, mode: int = 0o755) -> None:
        """Copy bytes into the guest through the agent (guest-file-*), then chmod."""
        handle = self.agent(
            name, {"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}}
        )
        try:
            for i in range(0, len(data), AGENT_WRITE_CHUNK):
                chunk = base64.b64encode(data[i : i + AGENT_WRITE_CHUNK]).decode()
                self.agent(
                    name,
                    {
                        "execute": "guest-file-write",
                        "arguments": {"handle": handle, "buf-b64": chunk},
                    },
                    30,
                )
        finally:
            self.agent(name, {"execute": "guest-file-close", "arguments": {"handle": handle}})
        r = self.guest_exec(name, ["/bin/chmod", oct(mode)[2:], path])
        if r.rc != 0:
            raise GuestError(name, f"chmod {path}: {r.stderr.strip()}")

    def read_file(self, name: str, path: str) -> bytes:
        """The bytes of a guest file, read through the agent."""
        handle = self.agent(
            name, {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}
        )
        out = bytearray()
        try:
            while True:
                r = self.agent(
                    name,
                    {
                        "execute": "guest-file-read",
                        "arguments": {"handle": handle, "count": AGENT_READ_CHUNK},
                    },
                    30,
                )
                if not isinstance(r, dict):
                    break
                out += base64.b64decode(r.get("buf-b64", ""))
                if r.get("eof"):
                    break
        finally:
            self.agent(name, {"execute": "guest-file-close", "arguments": {"handle": handle}})
        return bytes(out)

    def teardown(self) -> list[str]:
        """Destroy and undefine every guest, delete overlays; returns the errors seen."""
        # In parallel: libvirt's destroy waits for each QEMU to exit (~2 s under load).
        with ThreadPoolExecutor(max_workers=8) as pool:
            per_guest = list(pool.map(self._remove_guest, reversed(self.guests)))
        self.guests.clear()
        return [e for errs in per_guest for e in errs]

    def _remove_guest(self, guest: Guest) -> list[str]:
        errors = remove_domain(self.conn, guest.name)
        if guest.spec.overlay is not None:
            errors += remove_path(guest.spec.overlay)
            with contextlib.suppress(OSError):  # the run's folder, once its last overlay is gone
                guest.spec.overlay.parent.rmdir()
        return errors


@dataclass(frozen=True)
class ExecResult:
    rc: int
    stdout: str
    stderr: str


def b64text(data: object) -> str:
    return base64.b64decode(data).decode(errors="replace") if isinstance(data, str) else ""


def read_console(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def tail(path: Path, chars: int = 300) -> str:
    return read_console(path)[-chars:].strip()


def remove_domain(conn: libvirt.virConnect, name: str) -> list[str]:
    """Destroy (if running) and undefine one domain; a domain already gone is fine."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return []
        return [f"{name}: lookup: {e.get_error_message()}"]
    errors = []
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as e:
        errors.append(f"{name}: destroy: {e.get_error_message()}")
    try:
        dom.undefine()
    except libvirt.libvirtError as e:
        errors.append(f"{name}: undefine: {e.get_error_message()}")
    return errors


def remove_path(path: Path) -> list[str]:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:
        return [f"{path}: {e.strerror}"]
    return []


def tagged_domains(conn: libvirt.virConnect, run_id: str | None = None) -> list[tuple[str, str]]:
    """(domain name, run id) of every domain densitylab tagged, optionally of one run."""
    found = []
    for dom in conn.listAllDomains():
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS_URI)
        except libvirt.libvirtError:
            continue  # not ours: no densitylab metadata element
        tag_run = ElementTree.fromstring(meta).get("run_id", "")
        if run_id is None or tag_run == run_id:
            found.append((dom.name(), tag_run))
    return found


def clean_domains(
    conn: libvirt.virConnect, run_ids: Iterable[str] | None = None
) -> tuple[list[str], list[str]]:
    """Remove tagged domains (all, or of the given runs) and overlay folders.

    Returns (what was removed, errors). Refuses nothing: only tagged domains are touched.
    """
    wanted = set(run_ids) if run_ids is not None else None
    removed: list[str] = []
    errors: list[str] = []
    for name, run_id in tagged_domains(conn):
        if wanted is None or run_id in wanted:
            errs = remove_domain(conn, name)
            errors += errs
            if not errs:
                removed.append(f"domain {name} (run {run_id})")
    if OVERLAY_ROOT.exists():
        for d in sorted(OVERLAY_ROOT.iterdir()):
            if wanted is None or d.name in wanted:
                errs = remove_path(d)
                errors += errs
                if not errs:
                    removed.append(f"overlays {d}")
    return removed, errors
