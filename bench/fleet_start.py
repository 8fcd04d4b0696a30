"""Fleet start-up: densitylab (libvirt) against plain QEMU processes, side by side.

Brings the same fleet of tiny guests to ready in two ways, alternating A B A B ...:

  A  densitylab: orchestrator.fleet defines the guests, starts them in parallel and
     waits for the serial marker plus a guest-agent ping; timed from before define to
     all ready. Teardown is timed, but not counted in the figure.
  B  baseline: one plain qemu-system-x86_64 per guest, started back to back in one
     process group (what `for i in ...; do qemu ... & done` does, without a shell), with
     the settings libvirt gives these guests; timed from the first launch until every
     serial log shows the ready marker and a guest-ping answers on every agent socket.

Both sides poll at the same interval (fleet.wait_ready's 0.1 s by default), so A/B
measures libvirt and orchestration overhead rather than polling granularity. The machine
is shared and noisy: read the ratio of a pair and its median, not the absolute times.

    .venv/bin/python bench/fleet_start.py [--rounds 5] [--guests 4] [--memory-mib 256]
    .venv/bin/python bench/fleet_start.py --show-command   # what B runs and A defines

Needs root and the lab daemons (scripts/labd start) and the tiny image (make images).
Every domain is tagged with the bench's run id, printed at the start: after a kill -9,
`--clean RUN_ID` removes that run's domains and nothing else (`densitylab clean` would
also stop every sampler on the host). The QEMUs of B die with this process
(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import fleet, images
from orchestrator.agent import fs, ksm, probe, sample
from orchestrator.errors import DensitylabError, GuestError, Interrupted
from orchestrator.interrupts import InterruptGuard, TeardownStack

log = logging.getLogger(__name__)

TARGET_RATIO = 1.10  # issue 13: within 1.10x of plain QEMU to ready at 16 guests
AGENT_PORT = "org.qemu.guest_agent.0"
PR_SET_PDEATHSIG = 1
# Rows of the "where the time goes" table, in order: seconds from the side's t0 (the
# teardown row is the teardown's own duration).
MARK_LABELS = {
    "define": "define returned",
    "started": "start_all / launch returned",
    "boot_ok": "last 'boot ok' seen",
    "ready_marker": "last 'ready' marker seen",
    "all_ready": "all ready (marker + agent ping)",
    "teardown": "teardown (not in the figure)",
}


@dataclass(frozen=True)
class Bench:
    """What both sides boot, and how they wait for it."""

    image: fleet.GuestImage
    guests: int
    memory_mib: int
    vcpus: int
    accel: str  # "tcg" or "kvm"
    timeout_s: float
    poll_s: float
    workdir: Path
    run_id: str

    @property
    def domain_type(self) -> str:
        return "kvm" if self.accel == "kvm" else "qemu"

    def name(self, side: str, round_no: int, i: int) -> str:
        return f"dl-{self.run_id}-{side.lower()}{round_no}-g{i}"


@dataclass
class Sample:
    """One side of one round: seconds to all ready, its marks and its teardown."""

    side: str
    round_no: int
    ready_s: float
    marks: dict[str, float] = field(default_factory=dict)
    teardown_s: float | None = None
    guest_cpu_s: float | None = None  # all its QEMUs' CPU time from launch to ready


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))


def ratios(a: Sequence[Sample], b: Sequence[Sample]) -> list[float]:
    """A/B of each completed pair (A of round r against B of the same round)."""
    b_by_round = {s.round_no: s.ready_s for s in b}
    return [s.ready_s / b_by_round[s.round_no] for s in a if s.round_no in b_by_round]


# ---------------------------------------------------------------- B: the QEMU command line


def machine_args(accel: str, memory_mib: int, vcpus: int) -> list[str]:
    """The machine libvirt builds from domain.xml.j2 (pc, anonymous RAM, no defaults)."""
    cpu = "host" if accel == "kvm" else "qemu64"  # host-passthrough vs the TCG model
    return [
        *("-machine", "pc,usb=off,dump-guest-core=off"),
        *("-accel", accel, "-cpu", cpu),
        *("-m", str(memory_mib), "-overcommit", "mem-lock=off"),
        *("-smp", f"{vcpus},sockets={vcpus},cores=1,threads=1"),
        *("-display", "none", "-no-user-config", "-nodefaults"),
        *("-rtc", "base=utc", "-boot", "strict=on", "-no-reboot"),
        # libvirt adds this USB controller by default (the template does not disable it).
        *("-device", "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2"),
    ]


def boot_args(image: fleet.GuestImage) -> list[str]:
    initrd = ["-initrd", str(image.initrd)] if image.initrd else []
    return ["-kernel", str(image.kernel), *initrd, "-append", image.cmdline]


def serial_args(console_log: Path) -> list[str]:
    return [
        *("-chardev", f"file,id=charserial0,path={console_log},append=on"),
        *("-device", "isa-serial,chardev=charserial0,id=serial0,index=0"),
    ]


def agent_args(agent_socket: Path) -> list[str]:
    """The guest-agent channel: a virtio-serial port on a listening unix socket."""
    return [
        *("-device", "virtio-serial-pci,id=virtio-serial0,bus=pci.0,addr=0x2"),
        *("-chardev", f"socket,id=charchannel0,path={agent_socket},server=on,wait=off"),
        *(
            "-device",
            f"virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
            f"name={AGENT_PORT}",
        ),
    ]


def qemu_argv(b: Bench, name: str) -> list[str]:
    return [
        fleet.EMULATOR,
        *("-name", f"guest={name},debug-threads=on"),
        *machine_args(b.accel, b.memory_mib, b.vcpus),
        *boot_args(b.image),
        *serial_args(b.workdir / f"{name}.log"),
        *agent_args(b.workdir / f"{name}.qga"),
    ]


# ---------------------------------------------------------------- B: processes and readiness


def _die_with_parent() -> None:
    """In the child before exec: a kill -9 of the bench must not leave QEMUs behind."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class PlainFleet:
    """Plain QEMU processes in one process group; stop() ends the group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pgid: int | None = None

    def launch(self, argv: Sequence[str], output: Path) -> None:
        """Start one QEMU in the background, in the group of the first one."""
        with output.open("wb") as out:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0 if self.pgid is None else self.pgid,
                # preexec_fn is unsafe only with threads in this process; none run here.
                preexec_fn=_die_with_parent,
            )
        self.procs.append(p)
        if self.pgid is None:
            self.pgid = p.pid

    def stop(self, grace_s: float = 5.0) -> list[str]:
        """SIGTERM the group, SIGKILL it after grace_s; returns what could not be ended."""
        if self.pgid is None:
            return []
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
        errors = []
        for p in self.procs:
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                errors.append(f"qemu pid {p.pid} survived SIGKILL for {grace_s:.0f}s")
        return errors

    def _signal(self, signum: int) -> None:
        # Never killpg(0, ...): that is the bench's own group.
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError):  # every member has exited
                os.killpg(self.pgid, signum)


def is_reply_to(line: bytes, sync_id: int) -> bool:
    """Whether a guest-agent line answers our guest-sync; stale replies and noise are not."""
    try:
        reply = json.loads(line)
    except ValueError:
        return False
    return isinstance(reply, dict) and reply.get("return") == sync_id


def agent_ping(path: Path, timeout_s: float = 2.0) -> bool:
    """guest-sync (skipping stale replies left by earlier clients), then guest-ping."""
    sync_id = secrets.randbelow(2**31)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(path))
            f = s.makefile("rwb")
            f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": sync_id}}).encode())
            f.flush()
            while not is_reply_to(line := f.readline(), sync_id):
                if not line or time.monotonic() > deadline:
                    return False  # closed, or only stale replies until the deadline
                s.settimeout(max(0.01, deadline - time.monotonic()))
            f.write(b'{"execute": "guest-ping"}')
            f.flush()
            return "return" in json.loads(f.readline())
    except (OSError, ValueError):  # not listening yet, timed out, closed, garbled
        return False


@dataclass
class PlainGuest:
    name: str
    proc: subprocess.Popen[bytes]
    console_log: Path
    agent_socket: Path
    boot_s: float | None = None
    marker_s: float | None = None
    ready_s: float | None = None


def check_plain(g: PlainGuest, t0_ns: int) -> bool:
    """One look at a plain guest: markers, liveness, then the agent. Raises GuestError."""
    text = fleet.read_console(g.console_log)
    now_s = (time.monotonic_ns() - t0_ns) / 1e9
    if g.boot_s is None and fleet.BOOT_MARKER in text:
        g.boot_s = now_s
    if fleet.ERROR_MARKER in text:
        raise GuestError(g.name, text[text.index(fleet.ERROR_MARKER) :].splitlines()[0])
    if g.proc.poll() is not None:
        raise GuestError(
            g.name, f"qemu exited {g.proc.returncode} (console: {fleet.tail(g.console_log)!r})"
        )
    if fleet.READY_MARKER not in text:
        return False
    if g.marker_s is None:
        g.marker_s = now_s
    if not agent_ping(g.agent_socket):
        return False
    g.ready_s = (time.monotonic_ns() - t0_ns) / 1e9
    return True


def wait_plain(guests: Sequence[PlainGuest], t0_ns: int, timeout_s: float, poll_s: float) -> None:
    """Like fleet.wait_ready: one deadline for all, every pending guest looked at per poll."""
    deadline = time.monotonic() + timeout_s
    pending = list(guests)
    while pending:
        pending = [g for g in pending if not check_plain(g, t0_ns)]
        if not pending:
            return
        if time.monotonic() > deadline:
            g = pending[0]
            raise GuestError(
                g.name, f"not ready after {timeout_s:.0f}s (console: {fleet.tail(g.console_log)!r})"
            )
        time.sleep(poll_s)


def qemu_cpu_s(pids: Sequence[int | None]) -> float | None:
    """CPU seconds (user + system) the QEMUs used so far; None if any is unknown.

    Same CPU-s on both sides but a longer wall time means A's guests waited for a CPU
    (contention, cgroup weight), not that libvirt added work.
    """
    if None in pids:
        return None
    try:
        return sum(sample.process_cpu_s(p) for p in pids if p is not None)
    except fs.AgentError:  # exited meanwhile
        return None


def stop_or_raise(plain: PlainFleet) -> None:
    errors = plain.stop()
    if errors:
        raise DensitylabError("plain qemu teardown: " + "; ".join(errors))


# ---------------------------------------------------------------- the two sides


def since_s(t0_ns: int) -> float:
    return (time.monotonic_ns() - t0_ns) / 1e9


def run_plain(b: Bench, round_no: int, guard: InterruptGuard) -> Sample:
    """B: launch every QEMU back to back, wait for all; the kill is timed separately."""
    guard.check()
    names = [b.name("B", round_no, i) for i in range(b.guests)]
    with TeardownStack(guard) as stack:
        plain = PlainFleet()
        stack.callback(stop_or_raise, plain)
        t0_ns = time.monotonic_ns()
        with guard.deferred():  # a signal between Popen and bookkeeping would lose a QEMU
            for name in names:
                plain.launch(qemu_argv(b, name), b.workdir / f"{name}.out")
        started_s = since_s(t0_ns)
        guard.check()
        guests = [
            PlainGuest(n, p, b.workdir / f"{n}.log", b.workdir / f"{n}.qga")
            for n, p in zip(names, plain.procs, strict=True)
        ]
        wait_plain(guests, t0_ns, b.timeout_s, b.poll_s)
        sample = Sample("B", round_no, since_s(t0_ns))
        sample.guest_cpu_s = qemu_cpu_s([p.pid for p in plain.procs])
        sample.marks = {
            "started": started_s,
            "boot_ok": max(g.boot_s or 0.0 for g in guests),
            "ready_marker": max(g.marker_s or 0.0 for g in guests),
            "all_ready": sample.ready_s,
        }
        td0_ns = time.monotonic_ns()
    sample.teardown_s = since_s(td0_ns)
    return sample


def run_densitylab(b: Bench, conn: Any, round_no: int, guard: InterruptGuard) -> Sample:
    """A: define, start_all, wait_ready through orchestrator.fleet; teardown timed apart."""
    guard.check()
    specs = [
        fleet.GuestSpec(
            name=(name := b.name("A", round_no, i)),
            memory_mib=b.memory_mib,
            vcpus=b.vcpus,
            image=b.image,
            console_log=b.workdir / f"{name}.log",
        )
        for i in range(b.guests)
    ]
    with TeardownStack(guard) as stack:
        fl = stack.enter_context(fleet.Fleet(conn, b.run_id, f"r{round_no}", b.domain_type))
        t0_ns = time.monotonic_ns()
        fl.define(specs)
        define_s = since_s(t0_ns)
        fl.start_all()
        started_s = since_s(t0_ns)
        fl.wait_ready(b.timeout_s)
        sample = Sample("A", round_no, since_s(t0_ns))
        sample.guest_cpu_s = qemu_cpu_s([g.pid for g in fl.guests])

        def from_t0(g: fleet.Guest, s: float | None) -> float:
            return (g.started_ns - t0_ns) / 1e9 + (s or 0.0)

        sample.marks = {
            "define": define_s,
            "started": started_s,
            "boot_ok": max(from_t0(g, g.boot_s) for g in fl.guests),
            "all_ready": sample.ready_s,
        }
        td0_ns = time.monotonic_ns()
    sample.teardown_s = since_s(td0_ns)
    return sample


# ---------------------------------------------------------------- output


def machine_line(conn: Any, accel: dict[str, object]) -> str:
    v = fleet.versions(conn)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    ksm_run = ksm.read_ksm_knobs().get("run", "?")
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, accel {accel['value']} "
        f"({accel['how']}), QEMU {v['qemu']}, libvirt {v['libvirt']}, "
        f"load {load}, KSM run={ksm_run}"
    )


def count_qemus(proc: Path = Path("/proc")) -> int:
    """QEMU processes running now (called between the sides, when none are ours)."""
    n = 0
    for comm in proc.glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):  # the process exited while we looked
            n += comm.read_text().startswith("qemu-system")
    return n


def round_row(a: Sample, b: Sample, other_qemus: int) -> str:
    return (
        f"{a.round_no:>5}  {a.ready_s:>12.3f}  {b.ready_s:>12.3f}  {a.ready_s / b.ready_s:>6.3f}"
        f"  {a.teardown_s or 0:>10.3f}  {b.teardown_s or 0:>8.3f}  {other_qemus:>11}"
    )


ROUND_HEADER = (
    f"{'round':>5}  {'A densitylab':>12}  {'B plain qemu':>12}  {'A/B':>6}"
    f"  {'A teardown':>10}  {'B kill':>8}  {'other QEMUs':>11}   (seconds)"
)

# Why the note: libvirt puts every guest's threads under the `machine` cpu cgroup
# (cgroup v1, cpu.shares 1024), so A's whole fleet, together with any other libvirt
# guest, weighs as much as one ordinary process, while each of B's QEMUs is an ordinary
# process of its own. On a busy host the two sides are not weighted alike: a CPU hog
# outside `machine` slows A more than B; a libvirt guest inside it can do the reverse.
CONTENTION_NOTE = (
    "note: other QEMUs ran during {n} of {total} rounds; those pairs measure contention "
    "as much as densitylab. Same QEMU CPU-s with a lower CPU share means the guests "
    "waited for a CPU, not that libvirt added work (A's guests share libvirt's `machine` "
    "cpu cgroup, B's QEMUs compete one by one)."
)


def summary_lines(a: Sequence[Sample], b: Sequence[Sample], nproc: int) -> list[str]:
    """Median, min, max to ready of each side, A/B per pair, and where the time goes."""
    lines = [f"\n{'seconds to ready':<20} {'median':>8} {'min':>8} {'max':>8}  n"]
    for label, samples in (("A densitylab", a), ("B plain qemu", b)):
        if samples:
            s = Spread.of([x.ready_s for x in samples])
            lines.append(
                f"{label:<20} {s.median:>8.3f} {s.min:>8.3f} {s.max:>8.3f}  {len(samples)}"
            )
    r = ratios(a, b)
    if r:
        s = Spread.of(r)
        verdict = "met" if s.median <= TARGET_RATIO else "NOT met"
        lines.append(
            f"{'A/B per pair':<20} {s.median:>8.3f} {s.min:>8.3f} {s.max:>8.3f}  {len(r)}"
            f"   target median <= {TARGET_RATIO}: {verdict}"
        )
    lines += ["", f"{'where the time goes (median s from t0)':<40} {'A':>8} {'B':>8}"]
    for key, label in MARK_LABELS.items():
        lines.append(f"  {label:<38} {_median(a, key, nproc)} {_median(b, key, nproc)}")
    for key, label in (
        ("cpu_s", "QEMU CPU-s until ready (all guests)"),
        ("cpu_share", f"guests' share of the {nproc} CPUs"),
    ):
        lines.append(f"  {label:<38} {_median(a, key, nproc)} {_median(b, key, nproc)}")
    return lines


def _value(s: Sample, key: str, nproc: int) -> float | None:
    if key == "teardown":
        return s.teardown_s
    if key == "cpu_s":
        return s.guest_cpu_s
    if key == "cpu_share":
        return None if s.guest_cpu_s is None else s.guest_cpu_s / (s.ready_s * nproc)
    return s.marks.get(key)


def _median(samples: Sequence[Sample], key: str, nproc: int) -> str:
    present = [v for s in samples if (v := _value(s, key, nproc)) is not None]
    return f"{statistics.median(present):>8.3f}" if present else f"{'-':>8}"


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="A B pairs (default 5)")
    ap.add_argument("--guests", type=int, default=4, help="guests per fleet (default 4)")
    ap.add_argument("--memory-mib", type=int, default=256, help="per guest (default 256)")
    ap.add_argument("--vcpus", type=int, default=1, help="per guest (default 1)")
    ap.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto")
    ap.add_argument("--timeout-s", type=float, default=120, help="per fleet boot")
    ap.add_argument("--poll-s", type=float, default=0.1, help="B's poll interval (A: 0.1 s)")
    ap.add_argument("--show-command", action="store_true", help="print B's argv, A's XML")
    ap.add_argument("--clean", metavar="RUN_ID", help="remove a killed bench run's domains")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    for name in ("rounds", "guests", "memory_mib", "vcpus"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    return args


def warm_page_cache(image: fleet.GuestImage) -> None:
    """Read kernel and initrd once, so round 1's A is not charged for a cold read."""
    for p in (image.kernel, image.initrd):
        if p is not None:
            p.read_bytes()


def show_command(b: Bench) -> None:
    print("B:", subprocess.list2cmdline(qemu_argv(b, b.name("B", 1, 0))))
    spec = fleet.GuestSpec(b.name("A", 1, 0), b.memory_mib, b.vcpus, b.image, b.workdir / "a.log")
    print("A:", fleet.domain_xml(spec, run_id=b.run_id, trial_id="r1", domain_type=b.domain_type))


def run(b: Bench, rounds: int, accel_fact: dict[str, object]) -> int:
    try:
        conn = fleet.connect()
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(machine_line(conn, accel_fact))
    print(
        f"fleet: {b.guests} guests x {b.memory_mib} MiB, {b.vcpus} vCPU, {rounds} rounds "
        f"A B alternating, poll {b.poll_s} s, run id {b.run_id}\n"
    )
    print(ROUND_HEADER, flush=True)
    a: list[Sample] = []
    bs: list[Sample] = []
    busy_rounds = 0
    status = 0
    try:
        with InterruptGuard().installed() as guard:
            for r in range(1, rounds + 1):
                others = count_qemus()
                a.append(run_densitylab(b, conn, r, guard))
                others = max(others, count_qemus())
                bs.append(run_plain(b, r, guard))
                others = max(others, count_qemus())
                busy_rounds += others > 0
                print(round_row(a[-1], bs[-1], others), flush=True)
    except Interrupted as e:
        print(f"\n{e}: everything torn down; rounds so far:", file=sys.stderr)
        status = 130
    except DensitylabError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        status = 1
    finally:
        conn.close()
    nproc = len(os.sched_getaffinity(0))
    print("\n".join(summary_lines(a, bs, nproc)) if a else "no round completed")
    if busy_rounds:
        print("\n" + CONTENTION_NOTE.format(n=busy_rounds, total=len(bs)))
    return status


def clean(run_id: str) -> int:
    """Remove the domains a killed bench run left (only bench runs, only that one)."""
    if not run_id.startswith("bench-fs"):
        print(f"error: {run_id!r} is not a run id of this bench (bench-fs...)", file=sys.stderr)
        return 2
    try:
        conn = fleet.connect()
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        removed, errors = fleet.clean_domains(conn, [run_id])
    finally:
        conn.close()
    print("\n".join(removed) or f"nothing left by {run_id}")
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.clean:
        return clean(args.clean)
    accel_fact = probe.probe_accel()
    accel = str(accel_fact["value"]) if args.accel == "auto" else args.accel
    try:
        tiny = images.find_tiny_image()
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    image = fleet.GuestImage(kernel=tiny.kernel, initrd=tiny.initrd)
    token = f"{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
    with tempfile.TemporaryDirectory(prefix="dl-fleetstart-") as tmp:
        b = Bench(
            image=image,
            guests=args.guests,
            memory_mib=args.memory_mib,
            vcpus=args.vcpus,
            accel=accel,
            timeout_s=args.timeout_s,
            poll_s=args.poll_s,
            workdir=Path(tmp),
            run_id=f"bench-fs{token}",
        )
        if args.show_command:
            show_command(b)
            return 0
        warm_page_cache(image)
        return run(b, args.rounds, accel_fact)


if __name__ == "__main__":
    sys.exit(main())
