"""rmap_walk_ksm latency collectors: a private tracefs instance with kprobes (or the
migration-entry proxy), or BPF fentry/fexit; one JSON line per walk."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import bpf, cmd
from .fs import PROC, STATE_DIR, AgentError, read_text, write_text
from .procs import pid_alive


def tracefs_mountpoint(mounts_text: str) -> Path | None:
    """Where tracefs is mounted already, from /proc/self/mounts text."""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs":
            return Path(parts[1])
    return None


@contextlib.contextmanager
def tracefs(state_dir: Path = STATE_DIR) -> Any:
    """Yield a tracefs root; mount one on our own mount point when none is, unmount after.

    Our own mount point (not /sys/kernel/tracing) so that unmounting can never pull the
    ground from under another tracer on the host.
    """
    existing = tracefs_mountpoint(read_text(PROC / "self" / "mounts"))
    if existing is not None:
        yield existing
        return
    mnt = state_dir / "tracefs"
    mnt.mkdir(parents=True, exist_ok=True)
    cmd.run(["mount", "-t", "tracefs", "nodev", str(mnt)], timeout_s=30)
    try:
        yield mnt
    finally:
        cmd.run(["umount", str(mnt)], timeout_s=30, check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


# Every method `trace --method` takes, cheapest exact one first (the probe's order).
METHODS = ("tracepoint", "bpf-fentry", "kprobe", "tracepoint-proxy")
# The rmap walk series' own tracepoint (with the walk's duration); in no Debian kernel yet.
RMAP_WALK_EVENT = "rmap/rmap_walk"
# How often the BPF collector copies its ring buffer to the file.
RING_POLL_S = 0.25
KALLSYMS = Path("/proc/kallsyms")
TRACE_INSTANCE_PREFIX = "densitylab-"
KPROBE_GROUP_PREFIX = "densitylab_"
# `comm-pid [cpu] flags ts: event: fields`; the flags column is absent with irq-info off.
TRACE_LINE_RE = re.compile(
    r"^\s*(?P<comm>.+?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?:\S+\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s*(?P<rest>.*)$"
)
FIELD_RE = re.compile(r"(\w+)=(\S+?),?(?=\s|$)")


def parse_trace_line(line: str) -> dict[str, Any] | None:
    """One tracefs text line -> {comm, pid, cpu, ts_ns, event, fields, rest}; None if not one."""
    m = TRACE_LINE_RE.match(line)
    if m is None:
        return None
    sec, _, frac = m.group("ts").partition(".")
    ts_ns = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
    rest = m.group("rest")
    return {
        "comm": m.group("comm").strip(),
        "pid": int(m.group("pid")),
        "cpu": int(m.group("cpu")),
        "ts_ns": ts_ns,
        "event": m.group("event"),
        "fields": dict(FIELD_RE.findall(rest)),
        "rest": rest,
    }


class ProxyGrouper:
    """rmap-walk spans from consecutive `migrate:set_migration_pte` events.

    Migrating a page walks its reverse map and installs one migration entry per mapping;
    every PTE of one walk gets the same entry value. The span from the first to the
    last event of one entry is a lower bound of that walk's time (the walk began before
    the first PTE and ends after the last). Pages mapped once give no span: skipped.
    """

    def __init__(self) -> None:
        self.open: dict[int, dict[str, Any]] = {}  # per CPU: the group being collected

    def feed(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        if ev["event"] != "set_migration_pte":
            return None
        pte = ev["fields"].get("pte")
        cur = self.open.get(ev["cpu"])
        if cur is not None and cur["pte"] == pte and cur["pid"] == ev["pid"]:
            cur["last_ns"] = ev["ts_ns"]
            cur["mappings"] += 1
            return None
        self.open[ev["cpu"]] = {
            "pte": pte,
            "pid": ev["pid"],
            "comm": ev["comm"],
            "first_ns": ev["ts_ns"],
            "last_ns": ev["ts_ns"],
            "mappings": 1,
        }
        return self.close(cur)

    def flush(self) -> list[dict[str, Any]]:
        out = [self.close(g) for g in self.open.values()]
        self.open.clear()
        return [s for s in out if s is not None]

    @staticmethod
    def close(g: dict[str, Any] | None) -> dict[str, Any] | None:
        if g is None or g["mappings"] < 2:
            return None
        return {
            "ts_ns": g["first_ns"],
            "duration_ns": g["last_ns"] - g["first_ns"],
            "method": "tracepoint-proxy",
            "lower_bound": True,
            "mappings": g["mappings"],
            "pid": g["pid"],
            "comm": g["comm"],
        }


class KprobePairer:
    """rmap_walk_ksm durations from kprobe entry/return events paired per pid."""

    def __init__(self, entry: str, ret: str) -> None:
        self.entry, self.ret = entry, ret
        self.started: dict[int, tuple[int, str, str | None]] = {}

    def feed(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        if ev["event"] == self.entry:
            walk_func = ev["fields"].get("rmap_one")  # "try_to_migrate_one+0x0/0x2a0"
            walk_func = walk_func.split("+", 1)[0] if walk_func else None
            self.started[ev["pid"]] = (ev["ts_ns"], ev["comm"], walk_func)
            return None
        if ev["event"] != self.ret or ev["pid"] not in self.started:
            return None
        t0, comm, walk_func = self.started.pop(ev["pid"])
        caller = re.search(r"\((\S+?)\+", ev["rest"])
        return {
            "ts_ns": t0,
            "duration_ns": ev["ts_ns"] - t0,
            "method": "kprobe",
            "lower_bound": False,
            "pid": ev["pid"],
            "comm": comm,
            "caller": caller.group(1) if caller else None,
            "rmap_one": walk_func,
        }

    def flush(self) -> list[dict[str, Any]]:
        return []


class TraceInstance:
    """A private tracefs instance (own buffer, own clock): global tracing is untouched."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.dir = root / "instances" / name
        self.enabled: list[Path] = []

    def __enter__(self) -> TraceInstance:
        self.dir.mkdir()
        # CLOCK_MONOTONIC, so trace timestamps line up with the samplers' ts_ns.
        write_text(self.dir / "trace_clock", "mono")
        write_text(self.dir / "buffer_size_kb", "8192")
        return self

    def enable(self, event: str) -> None:
        path = self.dir / "events" / event / "enable"
        write_text(path, "1")
        self.enabled.append(path)

    def disable_events(self) -> None:
        for path in self.enabled:
            with contextlib.suppress(AgentError):
                write_text(path, "0")

    def __exit__(self, *exc: object) -> None:
        self.disable_events()
        remove_trace_instance(self.dir)


def remove_trace_instance(path: Path) -> None:
    """rmdir an instance; the kernel refuses while its trace_pipe is open, so retry."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    raise AgentError(f"{path}: cannot remove trace instance")


def kprobe_definitions(group: str, walk_func_off: int | None = None) -> list[str]:
    """Entry and return probes; the entry one fetches rwc->rmap_one (rwc: the second
    argument, %si on x86-64) as a symbol where BTF gave its offset."""
    entry = f"p:{group}/rwk rmap_walk_ksm"
    if walk_func_off is not None:
        entry += f" rmap_one=+{walk_func_off}(%si):symbol"
    return [entry, f"r:{group}/rwkr rmap_walk_ksm"]


def walk_func_offset_or_none() -> int | None:
    """rmap_one's offset from the kernel's BTF; None without BTF (walks stay unnamed)."""
    try:
        return bpf.walk_func_offset()
    except AgentError:
        return None


def append_line(path: Path, line: str) -> None:
    """One write with O_APPEND: tracefs control files refuse the seek of open(..., "a")."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as e:
        raise AgentError(f"{path}: cannot add {line!r}: {e.strerror}") from e
    finally:
        os.close(fd)


def add_kprobes(root: Path, group: str) -> None:
    for d in kprobe_definitions(group, walk_func_offset_or_none()):
        append_line(root / "kprobe_events", d)


def remove_kprobes(root: Path, group: str) -> None:
    """Remove our kprobe events (idempotent: absent events are fine)."""
    path = root / "kprobe_events"
    if not path.exists():
        return
    for name in ("rwk", "rwkr"):
        with contextlib.suppress(AgentError, OSError):
            append_line(path, f"-:{group}/{name}")


def stream_trace(pipe: Path, handle: Any, out: Any, should_stop: Any, spool: Path) -> None:
    """Copy trace_pipe to `spool` until should_stop(), then parse the spool into samples
    (JSON lines to `out`).

    While the workload runs, the collector only copies bytes a few times a second: no
    parse, no JSON, and no poll() waiter (a waiter makes the kernel wake the reader on
    every event). Parsing each event beside the workload on the same vCPUs is what made
    this collector cost 11-20% of migration throughput in a lab host."""
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open(spool, "ab") as sp:
            while True:
                stopping = should_stop()
                copied = copy_available(fd, sp)
                if stopping and not copied:
                    break
                if not stopping:
                    time.sleep(RING_POLL_S)
    finally:
        os.close(fd)
    parse_spool(spool, handle, out)
    spool.unlink()


def copy_available(fd: int, sp: Any) -> int:
    """Copy what a non-blocking fd has now to sp; returns the bytes copied."""
    n = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        sp.write(chunk)
        n += len(chunk)
    sp.flush()
    return n


def parse_spool(spool: Path, handle: Any, out: Any) -> None:
    """Feed every trace line of a spool file to handle; its samples to out as JSON lines."""
    with open(spool, "rb") as f:
        for raw in f:
            ev = parse_trace_line(raw.decode(errors="replace").rstrip("\n"))
            sample = handle.feed(ev) if ev else None
            if sample:
                out.write(json.dumps(sample) + "\n")
    for sample in handle.flush():
        out.write(json.dumps(sample) + "\n")
    out.flush()


def run_collector(method: str, out: Path, tag: str, parent_pid: int | None = None) -> None:
    """Collect rmap_walk_ksm latency samples with `method` until SIGTERM/SIGINT.

    Everything it sets up (instance, kprobe events, our tracefs mount) is removed on
    the way out, whatever ends it.
    """
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: stopping.append(s))
    signal.signal(signal.SIGINT, lambda s, f: stopping.append(s))

    def should_stop() -> bool:
        return bool(stopping) or (parent_pid is not None and not pid_alive(parent_pid))

    if method == "bpf-fentry":
        run_fentry_collector(out, should_stop)
        print("collector: stopped", file=sys.stderr, flush=True)
        return
    with tracefs() as root, open(out, "a") as f:
        group = KPROBE_GROUP_PREFIX + tag
        try:
            with TraceInstance(root, TRACE_INSTANCE_PREFIX + tag) as inst:
                handle: Any
                if method == "kprobe":
                    add_kprobes(root, group)
                    inst.enable(f"{group}/rwk")
                    inst.enable(f"{group}/rwkr")
                    handle = KprobePairer("rwk", "rwkr")
                elif method == "tracepoint-proxy":
                    inst.enable("migrate/set_migration_pte")
                    handle = ProxyGrouper()
                elif method == "tracepoint":
                    inst.enable(RMAP_WALK_EVENT)
                    handle = WalkEventReader(duration_field(root / "events" / RMAP_WALK_EVENT))
                else:
                    raise AgentError(f"unknown latency method {method!r}")
                print("collector: ready", file=sys.stderr, flush=True)
                spool = out.with_name(out.name + ".trace")
                stop = quiet_on_stop(inst, should_stop)
                stream_trace(inst.dir / "trace_pipe", handle, f, stop, spool)
        finally:
            if method == "kprobe":
                remove_kprobes(root, group)
    # Said only once everything above is removed: a killed collector never says it.
    print("collector: stopped", file=sys.stderr, flush=True)


def quiet_on_stop(inst: TraceInstance, should_stop: Any) -> Any:
    """should_stop that, the first time it says stop, disables the events: the drain then
    reads what is buffered instead of racing new events (a busy walk source can emit
    faster than a slow VM parses)."""
    quiet: list[bool] = []

    def check() -> bool:
        if not should_stop():
            return False
        if not quiet:
            inst.disable_events()
            quiet.append(True)
        return True

    return check


def run_fentry_collector(out: Path, should_stop: Any) -> None:
    """BPF fentry/fexit on rmap_walk_ksm (see bpf.py). While collecting, the ring
    buffer's bytes only go to `out`.raw; the JSON lines are written once the programs
    are detached, so no per-walk work runs beside the workload being timed."""
    raw_path = out.with_name(out.name + ".raw")
    with bpf.FentryTimer("rmap_walk_ksm") as timer, open(raw_path, "ab") as raw:
        print("collector: ready", file=sys.stderr, flush=True)
        while not should_stop():
            raw.write(timer.take())
            raw.flush()
            time.sleep(RING_POLL_S)
        raw.write(timer.take())
    write_fentry_samples(raw_path, out)
    raw_path.unlink()


def write_fentry_samples(raw_path: Path, out: Path, kallsyms: Path = KALLSYMS) -> int:
    """Append the walks of a raw ring buffer file to `out` as JSON lines; returns how
    many. `pid` is the thread id, as in the kprobe collector's trace lines; `rmap_one`
    the walk's function by name (its address in hex where /proc/kallsyms hides it)."""
    walks = list(bpf.records(raw_path.read_bytes()))
    names = symbol_names({w[4] for w in walks}, kallsyms)
    with open(out, "a") as f:
        for ts, dur, tid, _tgid, walk_func, comm in walks:
            sample = {"ts_ns": ts, "duration_ns": dur, "method": "bpf-fentry"}
            sample |= {"lower_bound": False, "pid": tid, "comm": comm}
            sample["rmap_one"] = names.get(walk_func) or (f"{walk_func:#x}" if walk_func else None)
            f.write(json.dumps(sample) + "\n")
    return len(walks)


def symbol_names(addresses: set[int], kallsyms: Path = KALLSYMS) -> dict[int, str]:
    """Kernel symbol of each address that starts one (a function pointer does); addresses
    read as 0 when kptr_restrict hides them, and then nothing is named."""
    wanted = {a for a in addresses if a}
    found: dict[int, str] = {}
    if not wanted:
        return found
    try:
        with open(kallsyms) as f:
            for line in f:
                addr, _kind, name = line.split()[:3]
                a = int(addr, 16)
                if a in wanted and a not in found:
                    found[a] = name
    except (OSError, ValueError):
        return found
    return found


def duration_field(event_dir: Path) -> str:
    """The field of a walk tracepoint that holds its duration, from its format file."""
    fields = re.findall(r"field:[^;]*?(\w+);", read_text(event_dir / "format"))
    named = [f for f in fields if "duration" in f or f.endswith("_ns")]
    if not named:
        raise AgentError(f"{event_dir}/format: no duration field in {', '.join(fields)}")
    return str(named[0])


class WalkEventReader:
    """Walks from a tracepoint that reports each walk with its duration (ns): the
    event's time stamp is its end, so the walk began duration_ns earlier."""

    def __init__(self, field: str) -> None:
        self.field = field

    def feed(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        value = ev["fields"].get(self.field)
        if ev["event"] != RMAP_WALK_EVENT.split("/")[1] or value is None:
            return None
        dur = int(value, 0)
        return {
            "ts_ns": ev["ts_ns"] - dur,
            "duration_ns": dur,
            "method": "tracepoint",
            "lower_bound": False,
            "pid": ev["pid"],
            "comm": ev["comm"],
        }

    def flush(self) -> list[dict[str, Any]]:
        return []
