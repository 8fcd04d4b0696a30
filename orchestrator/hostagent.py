"""Host agent: everything densitylab reads or writes under /sys, /proc and tracefs.

Stdlib only, one file, so the same code runs on this machine, on a lab machine over
Ansible and inside a lab-host VM (`python3 hostagent.py SUBCOMMAND`). It owns the KSM
knobs (apply and restore), the samplers (KSM counters, ksmd CPU, /proc/vmstat, meminfo,
per-process KSM stats) and the capability probes that `densitylab doctor` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

KSM_DIR = Path("/sys/kernel/mm/ksm")
PROC = Path("/proc")
STATE_DIR = Path(os.environ.get("DENSITYLAB_STATE", "/run/densitylab"))

KSM_COUNTERS = (
    "full_scans",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "general_profit",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)
# Knobs the kernel refuses to change (EBUSY) while KSM pages exist; `run=2` unmerges first.
KNOBS_NEEDING_UNMERGE = ("merge_across_nodes", "max_page_sharing")
VMSTAT_PREFIXES = (
    "ksm",
    "cow_ksm",
    "pswp",
    "pgmigrate",
    "compact_",
    "numa_pages_migrated",
    "thp_migration",
    "pgsteal",
    "pgscan",
    "swap_ra",
    "workingset",
)
MEMINFO_FIELDS = ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree")
# How often the sampler re-reads a process's VMA layout from smaps (see read_process_ksm).
VMAS_EVERY_S = 10.0
PROCESS_KSM_FIELDS = ("ksm_rmap_items", "ksm_zero_pages", "ksm_merging_pages", "ksm_process_profit")


class AgentError(Exception):
    """A host-side read or write failed; the message names the file."""


# ---------------------------------------------------------------- small file helpers


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise AgentError(f"{path}: {e.strerror or e}") from e


def write_text(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise AgentError(f"{path}: cannot write {value!r}: {e.strerror or e}") from e


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def parse_key_values(text: str, sep: str | None = None) -> dict[str, int]:
    """Parse 'key value' (or 'key: value kB') lines; non-integer values are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ", 1).split() if sep is None else line.split(sep)
        if len(parts) >= 2:
            with contextlib.suppress(ValueError):
                out[parts[0].strip()] = int(parts[1])
    return out


# ---------------------------------------------------------------- KSM knobs


def ksm_knob_names(ksm_dir: Path = KSM_DIR) -> list[str]:
    """The writable knobs of this kernel's KSM (they differ between kernel versions)."""
    if not ksm_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in ksm_dir.iterdir()
        if p.is_file() and p.name not in KSM_COUNTERS and os.access(p, os.W_OK)
    )


def knob_value(text: str) -> str:
    """A knob's current value; choice knobs read as `[none] scan-time` mean `none`."""
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else text.strip()


def read_ksm_knobs(ksm_dir: Path = KSM_DIR) -> dict[str, str]:
    return {name: knob_value(read_text(ksm_dir / name)) for name in ksm_knob_names(ksm_dir)}


def read_ksm_counters(ksm_dir: Path = KSM_DIR) -> dict[str, int]:
    """KSM counters present on this kernel; absent ones are left out, not zeroed."""
    out: dict[str, int] = {}
    for name in KSM_COUNTERS:
        path = ksm_dir / name
        if path.exists():
            out[name] = int(read_text(path).split()[0])
    return out


def write_knob(ksm_dir: Path, name: str, value: str) -> None:
    """Write one knob; on EBUSY for knobs that need it, unmerge (run=2) and retry."""
    try:
        write_text(ksm_dir / name, value)
    except AgentError:
        if name not in KNOBS_NEEDING_UNMERGE:
            raise
        write_text(ksm_dir / "run", "2")
        write_text(ksm_dir / name, value)


def ordered_for_write(settings: Mapping[str, str]) -> list[tuple[str, str]]:
    """`run` goes last so ksmd starts only once every other knob is in place."""
    return sorted(settings.items(), key=lambda kv: (kv[0] == "run", kv[0]))


def apply_ksm(
    settings: Mapping[str, int | str], saved_path: Path, ksm_dir: Path = KSM_DIR
) -> dict[str, str]:
    """Save the current values of the named knobs to saved_path, then apply settings.

    The saved file is written before anything changes, so `restore_ksm` (or a later
    `densitylab clean` after kill -9) can always put the host back. A saved file that
    exists already is never overwritten, only completed: its values are the host's
    original ones. Returns the saved values. Raises AgentError naming the knob on an
    unknown or unwritable knob.
    """
    known = set(ksm_knob_names(ksm_dir))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise AgentError(f"{ksm_dir}: no writable KSM knob {', '.join(unknown)} on this kernel")
    current = read_ksm_knobs(ksm_dir)
    saved = {k: current[k] for k in settings}
    saved.setdefault("run", current.get("run", "0"))
    if saved_path.exists():
        # The file already holds the host's own values, saved before some run's settings
        # took effect (that run maybe killed with SIGKILL): the knobs in force now are that
        # run's, not the host's. Keep every saved value; add only knobs it lacks.
        saved = {**saved, **json.loads(read_text(saved_path))["knobs"]}
    write_json_atomic(saved_path, {"ksm_dir": str(ksm_dir), "knobs": saved})
    for name, value in ordered_for_write({k: str(v) for k, v in settings.items()}):
        write_knob(ksm_dir, name, value)
    return saved


def restore_ksm(saved_path: Path) -> list[str]:
    """Restore knobs from a saved file, keep going past failures, return the errors.

    The file is removed only when every knob was restored.
    """
    data = json.loads(read_text(saved_path))
    ksm_dir = Path(data["ksm_dir"])
    errors: list[str] = []
    for name, value in ordered_for_write(data["knobs"]):
        try:
            write_knob(ksm_dir, name, value)
        except AgentError as e:
            errors.append(str(e))
    if not errors:
        saved_path.unlink(missing_ok=True)
    return errors


# ---------------------------------------------------------------- samplers


def find_pid_by_comm(comm: str, proc: Path = PROC) -> int | None:
    for d in proc.iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm:
                    return int(d.name)
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_cpu_s(pid: int, proc: Path = PROC) -> float:
    """utime + stime of pid in seconds, from /proc/PID/stat (fields 14 and 15)."""
    stat = read_text(proc / str(pid) / "stat")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_vmstat(proc: Path = PROC, prefixes: Iterable[str] = VMSTAT_PREFIXES) -> dict[str, int]:
    allv = parse_key_values(read_text(proc / "vmstat"))
    pre = tuple(prefixes)
    return {k: v for k, v in allv.items() if k.startswith(pre)}


def read_meminfo_kib(proc: Path = PROC) -> dict[str, int]:
    allv = parse_key_values(read_text(proc / "meminfo"))
    return {k: allv[k] for k in MEMINFO_FIELDS if k in allv}


def count_mergeable_vmas(smaps_text: str) -> int:
    """VMAs whose VmFlags carry `mg` (MADV_MERGEABLE): QEMU's RAM, fragmented workloads."""
    return sum(
        1 for m in re.finditer(r"^VmFlags:(.*)$", smaps_text, re.M) if "mg" in m.group(1).split()
    )


def read_process_ksm(
    pid: int,
    proc: Path = PROC,
    vmas_cache: dict[int, tuple[float, int]] | None = None,
    vmas_every_s: float = 0.0,
) -> dict[str, int]:
    """Per-process KSM figures (/proc/PID/ksm_stat) and its mergeable VMA count.

    The VMA count needs /proc/PID/smaps, which walks the page tables under the mmap
    lock: its cost grows with guest memory and it disturbs what it measures. The layout
    changes only when a workload maps or fragments its region, so with a cache the
    count is read at most once per `vmas_every_s` per process (ksm_stat every time)."""
    base = proc / str(pid)
    stat = parse_key_values(read_text(base / "ksm_stat")) if (base / "ksm_stat").exists() else {}
    out = {k: stat[k] for k in PROCESS_KSM_FIELDS if k in stat}
    now = time.monotonic()
    cached = vmas_cache.get(pid) if vmas_cache is not None else None
    if cached is not None and now - cached[0] < vmas_every_s:
        out["ram_vmas"] = cached[1]
        return out
    out["ram_vmas"] = count_mergeable_vmas(read_text(base / "smaps"))
    if vmas_cache is not None:
        vmas_cache[pid] = (now, out["ram_vmas"])
    return out


def sample_once(
    pids: Mapping[str, int],
    ksmd_pid: int | None,
    ksm_dir: Path = KSM_DIR,
    proc: Path = PROC,
    vmas_cache: dict[int, tuple[float, int]] | None = None,
    vmas_every_s: float = 0.0,
) -> dict[str, Any]:
    """One sample of everything, stamped with CLOCK_MONOTONIC ns. Gone processes are skipped."""
    sample: dict[str, Any] = {"ts_ns": time.monotonic_ns(), "ksm": read_ksm_counters(ksm_dir)}
    sample["ksmd_cpu_s"] = process_cpu_s(ksmd_pid, proc) if ksmd_pid else None
    sample["vmstat"] = read_vmstat(proc)
    sample["meminfo_kib"] = read_meminfo_kib(proc)
    procs: dict[str, Any] = {}
    for name, pid in pids.items():
        with contextlib.suppress(AgentError):
            procs[name] = {"pid": pid, **read_process_ksm(pid, proc, vmas_cache, vmas_every_s)}
    sample["processes"] = procs
    return sample


def run_sampler(
    pids: Mapping[str, int],
    interval_s: float,
    out: Path,
    stop_after_s: float | None = None,
    parent_pid: int | None = None,
    vmas_every_s: float = VMAS_EVERY_S,
) -> None:
    """Append one JSON line per interval to `out` until SIGTERM/SIGINT (or stop_after_s).

    With parent_pid, it also stops when that process is gone, so a sampler whose
    orchestrator was killed with SIGKILL does not run on forever.
    """
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ksmd = find_pid_by_comm("ksmd")
    vmas_cache: dict[int, tuple[float, int]] = {}
    start = time.monotonic()
    next_tick = start
    with open(out, "a") as f:
        while not stopping:
            sample = sample_once(pids, ksmd, vmas_cache=vmas_cache, vmas_every_s=vmas_every_s)
            f.write(json.dumps(sample) + "\n")
            f.flush()
            next_tick += interval_s
            if stop_after_s is not None and next_tick - start > stop_after_s:
                break
            if parent_pid is not None and not pid_alive(parent_pid):
                break
            # Sleep in short slices so a stop signal ends the sampler promptly.
            while not stopping and time.monotonic() < next_tick:
                time.sleep(min(0.05, max(0.0, next_tick - time.monotonic())))


# ---------------------------------------------------------------- tracefs


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
    subprocess.run(
        ["mount", "-t", "tracefs", "nodev", str(mnt)], check=True, capture_output=True, timeout=30
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True, timeout=30)
        with contextlib.suppress(OSError):
            mnt.rmdir()


# ---------------------------------------------------------------- latency collectors

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
        self.started: dict[int, tuple[int, str]] = {}

    def feed(self, ev: dict[str, Any]) -> dict[str, Any] | None:
        if ev["event"] == self.entry:
            self.started[ev["pid"]] = (ev["ts_ns"], ev["comm"])
            return None
        if ev["event"] != self.ret or ev["pid"] not in self.started:
            return None
        t0, comm = self.started.pop(ev["pid"])
        caller = re.search(r"\((\S+?)\+", ev["rest"])
        return {
            "ts_ns": t0,
            "duration_ns": ev["ts_ns"] - t0,
            "method": "kprobe",
            "lower_bound": False,
            "pid": ev["pid"],
            "comm": comm,
            "caller": caller.group(1) if caller else None,
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


def kprobe_definitions(group: str) -> list[str]:
    return [f"p:{group}/rwk rmap_walk_ksm", f"r:{group}/rwkr rmap_walk_ksm"]


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
    for d in kprobe_definitions(group):
        append_line(root / "kprobe_events", d)


def remove_kprobes(root: Path, group: str) -> None:
    """Remove our kprobe events (idempotent: absent events are fine)."""
    path = root / "kprobe_events"
    if not path.exists():
        return
    for name in ("rwk", "rwkr"):
        with contextlib.suppress(AgentError, OSError):
            append_line(path, f"-:{group}/{name}")


def stream_trace(pipe: Path, handle: Any, out: Any, should_stop: Any) -> None:
    """Read trace_pipe until should_stop(); feed parsed events, write samples as JSON lines."""
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    buf = b""
    try:
        while True:
            stopping = should_stop()
            r, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 1 << 16) if r else b""
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                ev = parse_trace_line(raw.decode(errors="replace"))
                sample = handle.feed(ev) if ev else None
                if sample:
                    out.write(json.dumps(sample) + "\n")
            out.flush()
            if stopping and not chunk:
                break
    finally:
        os.close(fd)
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
        run_bpf_collector(out, should_stop)
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
                else:
                    raise AgentError(f"unknown latency method {method!r}")
                print("collector: ready", file=sys.stderr, flush=True)
                stream_trace(inst.dir / "trace_pipe", handle, f, quiet_on_stop(inst, should_stop))
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


BPF_PROGRAM = """
kfunc:rmap_walk_ksm { @start[tid] = nsecs; }
kretfunc:rmap_walk_ksm /@start[tid]/ {
  printf("%lld %lld %d %s\\n", @start[tid], nsecs - @start[tid], pid, comm);
  delete(@start[tid]);
}
"""


def run_bpf_collector(out: Path, should_stop: Any) -> None:
    """bpftrace fentry/fexit; bpftrace's nsecs is CLOCK_MONOTONIC like our samplers."""
    p = subprocess.Popen(
        ["bpftrace", "-e", BPF_PROGRAM],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    try:
        with open(out, "a") as f:
            print("collector: ready", file=sys.stderr, flush=True)
            while not should_stop() and p.poll() is None:
                select.select([p.stdout], [], [], 0.2)
                for line in p.stdout.readlines():
                    parts = line.split(maxsplit=3)
                    if len(parts) == 4 and parts[0].isdigit():
                        f.write(
                            json.dumps(
                                {
                                    "ts_ns": int(parts[0]),
                                    "duration_ns": int(parts[1]),
                                    "method": "bpf-fentry",
                                    "lower_bound": False,
                                    "pid": int(parts[2]),
                                    "comm": parts[3].strip(),
                                }
                            )
                            + "\n"
                        )
                f.flush()
    finally:
        p.terminate()
        p.wait(timeout=10)


# ---------------------------------------------------------------- swap and reclaim


def free_zram_device(sys_block: Path = Path("/sys/block")) -> str | None:
    for d in sorted(sys_block.glob("zram*")):
        if read_text(d / "disksize").strip() == "0":
            return d.name
    return None


def swap_on(
    kind: str, size_mib: int, saved_path: Path, swapfile_dir: Path = Path("/var/lib/densitylab")
) -> str:
    """Provide swap of size_mib (zram or a swap file); recorded in saved_path first."""
    if kind == "zram":
        dev = free_zram_device()
        if dev is None:
            raise AgentError("/sys/block: no unused zram device")
        target = f"/dev/{dev}"
        write_json_atomic(saved_path, {"kind": "zram", "device": target})
        write_text(Path("/sys/block") / dev / "disksize", f"{size_mib}M")
    elif kind == "swapfile":
        swapfile_dir.mkdir(parents=True, exist_ok=True)
        target = str(swapfile_dir / f"swap-{saved_path.stem}")
        write_json_atomic(saved_path, {"kind": "swapfile", "device": target})
        with open(target, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, size_mib << 20)
        os.chmod(target, 0o600)
    else:
        raise AgentError(f"unknown swap kind {kind!r}")
    for argv in (["mkswap", target], ["swapon", "-p", "100", target]):
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if cp.returncode != 0:
            raise AgentError(f"{' '.join(argv)}: {cp.stderr.strip()}")
    return target


def swap_off(saved_path: Path) -> list[str]:
    """Undo swap_on: swapoff, reset zram or delete the file; returns errors."""
    data = json.loads(read_text(saved_path))
    target = data["device"]
    errors = []
    active = [ln.split()[0] for ln in read_text(PROC / "swaps").splitlines()[1:] if ln.strip()]
    if target in active:
        cp = subprocess.run(["swapoff", target], capture_output=True, text=True, timeout=600)
        if cp.returncode != 0:
            errors.append(f"swapoff {target}: {cp.stderr.strip()}")
    if not errors:
        if data["kind"] == "zram":
            dev = Path("/sys/block") / Path(target).name
            with contextlib.suppress(AgentError):
                write_text(dev / "reset", "1")
        else:
            Path(target).unlink(missing_ok=True)
        saved_path.unlink(missing_ok=True)
    return errors


def memory_cgroup_of(pid: int, mounts_text: str, proc: Path = PROC) -> Path:
    """The memory cgroup folder of a process (v1 memory controller, or the v2 one)."""
    v1 = {ln.split()[1]: ln for ln in mounts_text.splitlines() if " cgroup " in ln}
    for line in read_text(proc / str(pid) / "cgroup").splitlines():
        hid, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            for mnt, mline in v1.items():
                if "memory" in mline.split()[3].split(","):
                    return Path(mnt) / path.lstrip("/")
        if hid == "0":
            v2 = cgroup2_root(mounts_text)
            if v2 is not None and "memory" in read_text(v2 / "cgroup.controllers").split():
                return v2 / path.lstrip("/").removesuffix("/emulator")
    raise AgentError(f"{proc}/{pid}/cgroup: no memory cgroup")


def memcg_usage_bytes(cg: Path) -> int:
    for name in ("memory.usage_in_bytes", "memory.current"):
        if (cg / name).exists():
            return int(read_text(cg / name))
    raise AgentError(f"{cg}: no memory usage file")


def memcg_reclaim_v2(cg: Path, nbytes: int) -> bool:
    """cgroup v2 proactive reclaim; False when the kernel could not reclaim it all."""
    try:
        write_text(cg / "memory.reclaim", str(nbytes))
    except AgentError:
        return False
    return True


def memcg_set_limit_v1(cg: Path, nbytes: int | str) -> None:
    write_text(cg / "memory.limit_in_bytes", str(nbytes))


def memcg_create(name: str, mounts_text: str) -> Path:
    """A memory cgroup of our own (v2 if it has the memory controller, else v1)."""
    v2 = cgroup2_root(mounts_text)
    if v2 is not None and "memory" in read_text(v2 / "cgroup.controllers").split():
        if "memory" not in read_text(v2 / "cgroup.subtree_control").split():
            write_text(v2 / "cgroup.subtree_control", "+memory")
        cg = v2 / name
    else:
        cg = Path("/sys/fs/cgroup/memory") / name
    cg.mkdir(exist_ok=True)
    return cg


def memcg_add_pid(cg: Path, pid: int) -> None:
    write_text(cg / "cgroup.procs", str(pid))


def memcg_remove(cg: Path) -> None:
    """rmdir a cgroup of ours once its processes are gone (retries while they exit)."""
    for _ in range(100):
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    raise AgentError(f"{cg}: cannot remove cgroup (processes still in it?)")


MEMORY_BLOCKS = Path("/sys/devices/system/memory")
PFN_MASK = (1 << 55) - 1


def mergeable_ranges(pid: int, proc: Path = PROC) -> list[tuple[int, int]]:
    """(start, end) of every MADV_MERGEABLE mapping of a process, from its smaps."""
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in read_text(proc / str(pid) / "smaps").splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = head.split("-")
            current = (int(lo, 16), int(hi, 16))
        elif line.startswith("VmFlags:") and current and "mg" in line.split()[1:]:
            ranges.append(current)
    return ranges


def memory_blocks_of(pids: Iterable[int], proc: Path = PROC) -> dict[int, int]:
    """Memory block -> present mergeable pages of these processes in it (via pagemap)."""
    block_bytes = int(read_text(MEMORY_BLOCKS / "block_size_bytes"), 16)
    blocks: dict[int, int] = {}
    for pid in pids:
        with open(proc / str(pid) / "pagemap", "rb") as f:
            for lo, hi in mergeable_ranges(pid, proc):
                f.seek(lo // 4096 * 8)
                data = f.read((hi - lo) // 4096 * 8)
                for i in range(0, len(data), 8):
                    entry = int.from_bytes(data[i : i + 8], "little")
                    if entry >> 63:  # present
                        b = (entry & PFN_MASK) * 4096 // block_bytes
                        blocks[b] = blocks.get(b, 0) + 1
    return blocks


def offline_online_block(block: int, saved_path: Path) -> bool:
    """Offline a memory block (the kernel migrates every page out of it) and online it
    again. The block is recorded in saved_path while offline, for `clean`. Returns
    False when the kernel refuses (unmovable pages in the block)."""
    state = MEMORY_BLOCKS / f"memory{block}" / "state"
    if read_text(state).strip() != "online":
        return False
    write_json_atomic(saved_path, {"block": block})
    try:
        write_text(state, "offline")
    except AgentError:
        saved_path.unlink(missing_ok=True)
        return False
    write_text(state, "online")
    saved_path.unlink(missing_ok=True)
    return True


SYS_MOVE_PAGES_X86_64 = 279
# MOVE_ALL, not MOVE: a KSM page is mapped many times, and MPOL_MF_MOVE skips any page
# mapped by more than one process.
MPOL_MF_MOVE_ALL = 1 << 2


def sample_page_addresses(ranges: list[tuple[int, int]], count: int, page: int = 4096) -> list[int]:
    """`count` page addresses spread evenly over the ranges (all pages if fewer)."""
    pages = [a for lo, hi in ranges for a in range(lo, hi, page)]
    if count >= len(pages):
        return pages
    step = len(pages) / count
    return [pages[int(i * step)] for i in range(count)]


def move_pages(pid: int, addresses: list[int], node: int) -> dict[str, Any]:
    """move_pages(2) of another process's pages to `node` (needs CAP_SYS_NICE).

    Moving a sample of pages instead of every page (migratepages) walks as many KSM
    pages as the statistics need. Returns how many pages ended up on the node, how many
    were there already and how many the kernel refused, from the per-page status."""
    import ctypes

    n = len(addresses)
    if n == 0:
        return {"requested": 0, "moved": 0, "already": 0, "failed": 0}
    before = page_nodes(pid, addresses)
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (ctypes.c_void_p * n)(*addresses)
    nodes = (ctypes.c_int * n)(*([node] * n))
    status = (ctypes.c_int * n)()
    rc = libc.syscall(
        SYS_MOVE_PAGES_X86_64, pid, ctypes.c_ulong(n), pages, nodes, status, MPOL_MF_MOVE_ALL
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise AgentError(f"move_pages(pid {pid}, {n} pages): {os.strerror(err)}")
    ok = [s == node for s in status]
    already = sum(1 for b, o in zip(before, ok, strict=True) if o and b == node)
    moved = sum(ok) - already
    # Why pages stayed: a KSM page being merged or under writeback is EBUSY, a page not
    # faulted in (or swapped out) ENOENT.
    why: dict[str, int] = {}
    for s in status:
        if s < 0:
            name = errno_name(-s)
            why[name] = why.get(name, 0) + 1
    out: dict[str, Any] = {"requested": n, "moved": moved, "already": already}
    out["failed"] = n - sum(ok)
    if why:
        out["failed_because"] = why
    return out


def errno_name(code: int) -> str:
    import errno

    return errno.errorcode.get(code, str(code))


def page_nodes(pid: int, addresses: list[int]) -> list[int]:
    """The node each page is on now (move_pages with no target nodes only queries)."""
    import ctypes

    n = len(addresses)
    libc = ctypes.CDLL(None, use_errno=True)
    pages = (ctypes.c_void_p * n)(*addresses)
    status = (ctypes.c_int * n)()
    rc = libc.syscall(SYS_MOVE_PAGES_X86_64, pid, ctypes.c_ulong(n), pages, None, status, 0)
    if rc < 0:
        err = ctypes.get_errno()
        raise AgentError(f"move_pages query (pid {pid}): {os.strerror(err)}")
    return list(status)


def compact_memory(proc: Path = PROC) -> None:
    """Compact every zone now (blocks until done); it migrates KSM pages too."""
    write_text(proc / "sys" / "vm" / "compact_memory", "1")


# ---------------------------------------------------------------- capability probes


def fact(value: Any, how: str, **extra: Any) -> dict[str, Any]:
    """A probed fact and how it was found (a file read, a command run)."""
    return {"value": value, "how": how, **extra}


def probe_accel(
    dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")
) -> dict[str, Any]:
    """KVM usable for normal guests, or TCG only. KVM-PVM cannot boot normal kernels."""
    if not dev.exists():
        return fact("tcg", f"{dev} absent")
    if (sys_module / "kvm_pvm").exists():
        return fact(
            "tcg",
            f"{dev} present but {sys_module}/kvm_pvm loaded (KVM-PVM: normal "
            "kernels do not boot under it)",
            kvm_device=True,
            pvm=True,
        )
    if not os.access(dev, os.R_OK | os.W_OK):
        return fact("tcg", f"{dev} present but not read-writable by uid {os.getuid()}")
    return fact(
        "kvm", f"{dev} present and read-writable, no KVM-PVM module", kvm_device=True, pvm=False
    )


def probe_ksm(ksm_dir: Path = KSM_DIR) -> dict[str, Any]:
    if not (ksm_dir / "run").exists():
        return fact(False, f"{ksm_dir}/run absent (kernel without CONFIG_KSM)")
    writable = os.access(ksm_dir / "run", os.W_OK)
    return fact(
        writable,
        f"{ksm_dir}/run exists, {'writable' if writable else 'read-only'}",
        knobs=read_ksm_knobs(ksm_dir),
        counters=sorted(read_ksm_counters(ksm_dir)),
    )


def cgroup2_root(mounts_text: str) -> Path | None:
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def probe_cgroup(mounts_text: str, cgroup_root: Path = Path("/sys/fs/cgroup")) -> dict[str, Any]:
    """Which cgroup version owns the memory controller, and where."""
    v2 = cgroup2_root(mounts_text)
    if v2 is not None:
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "memory" in read_text(controllers).split():
            return fact(
                "v2",
                f"memory listed in {controllers}",
                memory_root=str(v2),
                reclaim_interface="memory.reclaim",
            )
    v1 = cgroup_root / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        how = f"{v1}/memory.limit_in_bytes exists"
        if v2 is not None:
            how += f"; cgroup2 at {v2} has no memory controller"
        return fact("v1", how, memory_root=str(v1), reclaim_interface="memory.limit_in_bytes")
    return fact(None, "no memory controller in cgroup v1 or v2")


def probe_swap(proc: Path = PROC, sys_block: Path = Path("/sys/block")) -> dict[str, Any]:
    active = [ln.split()[0] for ln in read_text(proc / "swaps").splitlines()[1:] if ln.strip()]
    zram = sorted(p.name for p in sys_block.glob("zram*")) if sys_block.exists() else []
    free_zram = [z for z in zram if read_text(sys_block / z / "disksize").strip() == "0"]
    methods = (["zram"] if free_zram else []) + ["swapfile"]
    how = (
        f"{proc}/swaps lists {len(active)} active; unused zram devices: "
        f"{', '.join(free_zram) or 'none'} ({sys_block})"
    )
    return fact(methods, how, active=active, zram_devices=zram)


def probe_numa(node_dir: Path = Path("/sys/devices/system/node")) -> dict[str, Any]:
    nodes = sorted(p.name for p in node_dir.glob("node[0-9]*")) if node_dir.exists() else []
    return fact(len(nodes) or 1, f"{len(nodes)} node* entries in {node_dir}", nodes=nodes)


def bpf_fentry_allowed(timeout_s: float = 30) -> tuple[bool, str]:
    """Attach an fentry probe to rmap_walk_ksm with bpftrace and detach at once."""
    prog = "kfunc:rmap_walk_ksm { } interval:ms:200 { exit(); }"
    try:
        cp = subprocess.run(
            ["bpftrace", "-e", prog], capture_output=True, text=True, timeout=timeout_s
        )
    except FileNotFoundError:
        return False, "bpftrace not installed"
    except subprocess.TimeoutExpired:
        return False, f"bpftrace did not finish in {timeout_s:.0f}s"
    if cp.returncode == 0:
        return True, "bpftrace attached kfunc:rmap_walk_ksm"
    errors = [ln for ln in cp.stderr.splitlines() if "ERROR" in ln] or ["no message"]
    last = errors[-1].split("ERROR:", 1)[-1].strip()
    return False, f"bpftrace kfunc:rmap_walk_ksm failed: {last}"


def probe_tracing(check_bpf: bool = True) -> dict[str, Any]:
    """Methods that can time rmap_walk_ksm here, best first, with why the others cannot."""
    methods: list[str] = []
    notes: dict[str, str] = {}
    if check_bpf:
        ok, why = bpf_fentry_allowed()
        notes["bpf-fentry"] = why
        if ok:
            methods.append("bpf-fentry")
    if "tracefs" not in read_text(PROC / "filesystems"):
        notes["kprobe"] = notes["tracepoint-proxy"] = "tracefs not in /proc/filesystems"
        return fact(methods, "; ".join(f"{k}: {v}" for k, v in notes.items()), methods=methods)
    with tracefs() as root:
        if (root / "kprobe_events").exists():
            methods.append("kprobe")
            notes["kprobe"] = f"{root}/kprobe_events exists"
        else:
            notes["kprobe"] = (
                f"{root}/kprobe_events absent (no CONFIG_KPROBE_EVENTS or locked down)"
            )
        proxy = root / "events" / "migrate" / "set_migration_pte"
        if proxy.exists():
            methods.append("tracepoint-proxy")
            notes["tracepoint-proxy"] = f"{proxy} exists (lower bound, migration only)"
        else:
            notes["tracepoint-proxy"] = f"{proxy} absent"
    return fact(methods, "; ".join(f"{k}: {v}" for k, v in notes.items()), methods=methods)


def probe_host(check_bpf: bool = True) -> dict[str, Any]:
    """Every host capability densitylab cares about, each with how it was detected."""
    mounts = read_text(PROC / "self" / "mounts")
    meminfo = read_meminfo_kib()
    return {
        "kernel_release": fact(os.uname().release, "uname -r"),
        "accel": probe_accel(),
        "ksm": probe_ksm(),
        "cgroup": probe_cgroup(mounts),
        "swap": probe_swap(),
        "numa": probe_numa(),
        "tracing": probe_tracing(check_bpf),
        "memory": fact(
            meminfo.get("MemTotal", 0) // 1024,
            "/proc/meminfo MemTotal (MiB)",
            available_mib=meminfo.get("MemAvailable", 0) // 1024,
        ),
        "cpus": fact(os.cpu_count(), "os.cpu_count()"),
    }


# ---------------------------------------------------------------- remote process control


def spawn_detached(argv: list[str], out: Path, pidfile: Path, cgroup: str | None = None) -> int:
    """Start argv detached (its own session, output to `out`), optionally inside a memory
    cgroup of ours joined before exec; write its pid. For remote hosts, where the
    caller's channel (a guest-agent exec) must return at once."""
    cg = memcg_create(cgroup, read_text(PROC / "self" / "mounts")) if cgroup else None
    pid = os.fork()
    if pid == 0:  # child: new session, then exec (never returns)
        os.setsid()
        if cg is not None:
            memcg_add_pid(cg, os.getpid())
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.execvp(argv[0], argv)
    write_text(pidfile, str(pid))
    return pid


def stop_pidfile(pidfile: Path, grace_s: float = 30) -> None:
    """SIGTERM the process (group) of a pidfile and wait for it; SIGKILL after grace_s."""
    if not pidfile.exists():
        return
    pid = int(read_text(pidfile))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostagent", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probe", help="print host capabilities as JSON")
    pr.add_argument("--no-bpf", action="store_true", help="skip the bpftrace attach test")
    s = sub.add_parser("sample", help="append JSON samples to a file until SIGTERM")
    s.add_argument("--interval-s", type=float, default=1.0)
    s.add_argument("--pid", action="append", default=[], metavar="NAME=PID")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--stop-after-s", type=float)
    s.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    a = sub.add_parser("ksm-apply", help="save KSM knobs to a file, then set them")
    a.add_argument("--saved", type=Path, required=True)
    a.add_argument("settings", nargs="+", metavar="KNOB=VALUE")
    t = sub.add_parser("trace", help="collect rmap_walk_ksm latency samples until SIGTERM")
    t.add_argument("--method", required=True, choices=["bpf-fentry", "kprobe", "tracepoint-proxy"])
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--tag", required=True, help="names our trace instance and kprobe group")
    t.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    sp = sub.add_parser("spawn", help="start a command detached, optionally in a cgroup")
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--pidfile", type=Path, required=True)
    sp.add_argument("--cgroup", help="memory cgroup to join before exec")
    sp.add_argument("argv", nargs="+")
    sub.add_parser("now", help="print CLOCK_MONOTONIC in ns (to line up remote phases)")
    st = sub.add_parser("stop", help="stop a process started by spawn")
    st.add_argument("--pidfile", type=Path, required=True)
    st.add_argument("--grace-s", type=float, default=30, help="SIGKILL after this long")
    sw = sub.add_parser("swap-on", help="provide swap (zram or swapfile)")
    sw.add_argument("--kind", choices=["zram", "swapfile"], default="zram")
    sw.add_argument("--mib", type=int, required=True)
    sw.add_argument("--saved", type=Path, required=True)
    so = sub.add_parser("swap-off", help="remove swap provided by swap-on")
    so.add_argument("--saved", type=Path, required=True)
    rc = sub.add_parser("reclaim", help="cgroup v2 memory.reclaim on a cgroup of ours")
    rc.add_argument("--cgroup", required=True)
    rc.add_argument("--mib", type=int, required=True)
    rc.add_argument("--json", action="store_true", help="print the result and its window")
    rm = sub.add_parser("cgroup-remove", help="remove a cgroup of ours")
    rm.add_argument("--cgroup", required=True)
    mp = sub.add_parser("move-pages", help="move a sample of a process's mergeable pages")
    mp.add_argument("--pid", type=int, required=True)
    mp.add_argument("--pages", type=int, required=True, help="pages to sample (0: all)")
    mp.add_argument("--node", type=int, required=True)
    mk = sub.add_parser("cgroup-create", help="make a memory cgroup of ours, print its path")
    mk.add_argument("--cgroup", required=True)
    r = sub.add_parser("ksm-restore", help="restore KSM knobs saved by ksm-apply")
    r.add_argument("--saved", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "probe":
            print(json.dumps(probe_host(check_bpf=not args.no_bpf), indent=2))
        elif args.cmd == "sample":
            pids = {k: int(v) for k, v in (x.split("=", 1) for x in args.pid)}
            run_sampler(pids, args.interval_s, args.out, args.stop_after_s, args.parent_pid)
        elif args.cmd == "trace":
            run_collector(args.method, args.out, args.tag, args.parent_pid)
        elif args.cmd == "spawn":
            print(spawn_detached(args.argv, args.out, args.pidfile, args.cgroup))
        elif args.cmd == "now":
            print(time.monotonic_ns())
        elif args.cmd == "stop":
            stop_pidfile(args.pidfile, args.grace_s)
        elif args.cmd == "swap-on":
            print(swap_on(args.kind, args.mib, args.saved))
        elif args.cmd == "swap-off":
            errors = swap_off(args.saved)
            for e in errors:
                print(f"hostagent: {e}", file=sys.stderr)
            return 1 if errors else 0
        elif args.cmd in ("reclaim", "cgroup-remove", "cgroup-create"):
            cg = memcg_create(args.cgroup, read_text(PROC / "self" / "mounts"))
            if args.cmd == "cgroup-create":
                print(cg)
            elif args.cmd == "cgroup-remove":
                memcg_remove(cg)
            else:
                start = time.monotonic_ns()
                ok = memcg_reclaim_v2(cg, args.mib << 20)
                result = "all" if ok else "partly"
                window = {"start_ns": start, "end_ns": time.monotonic_ns()}
                print(json.dumps({"result": result, **window}) if args.json else result)
        elif args.cmd == "move-pages":
            ranges = mergeable_ranges(args.pid)
            total = sum((hi - lo) // 4096 for lo, hi in ranges)
            addrs = sample_page_addresses(ranges, args.pages or total)
            start = time.monotonic_ns()
            moved = move_pages(args.pid, addrs, args.node)
            # The window on this host's clock, so the caller needs no round trips for it.
            print(json.dumps({**moved, "start_ns": start, "end_ns": time.monotonic_ns()}))
        elif args.cmd == "ksm-apply":
            apply_ksm(dict(x.split("=", 1) for x in args.settings), args.saved)
        elif args.cmd == "ksm-restore":
            errors = restore_ksm(args.saved)
            for e in errors:
                print(f"hostagent: {e}", file=sys.stderr)
            return 1 if errors else 0
    except AgentError as e:
        print(f"hostagent: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- leftovers


def _flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in argv (the last one if repeated), None if absent."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


class AgentHelper:
    """A host-agent sampler or collector process found in /proc, and which run it serves:
    its --out lies in results/<run-id>/trials/<trial>/, a collector's --tag is the run
    id with '_' for '-'."""

    def __init__(self, pid: int, argv: list[str]) -> None:
        self.pid = pid
        self.argv = argv
        self.out = _flag(argv, "--out")
        self.tag = _flag(argv, "--tag")
        parent = _flag(argv, "--parent-pid")
        self.parent_pid = int(parent) if parent and parent.isdigit() else None

    @property
    def run_id(self) -> str | None:
        """The run whose directory holds --out, when --out has the run store's shape."""
        if self.out is None:
            return None
        p = Path(self.out)
        return p.parent.parent.parent.name if p.parent.parent.name == "trials" else None

    def serves(self, run_id: str) -> bool:
        """Exact match only: a run id that is a substring of another run's is no match."""
        return bool(run_id) and (self.run_id == run_id or self.tag == run_id.replace("-", "_"))


def agent_helpers(proc: Path = PROC) -> list[AgentHelper]:
    """Every host-agent sampler and collector running here (but this process)."""
    me = os.getpid()
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        with contextlib.suppress(OSError):
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
            if not any(a.endswith("hostagent.py") for a in argv):
                continue
            if "sample" in argv or "trace" in argv:
                found.append(AgentHelper(int(d.name), argv))
    return found


def find_samplers(proc: Path = PROC, run_ids: Iterable[str] | None = None) -> list[int]:
    """Pids of host-agent samplers and collectors still running (their orchestrator may
    be gone); with run_ids, only those serving exactly one of those runs."""
    wanted = None if run_ids is None else list(run_ids)
    return [
        h.pid for h in agent_helpers(proc) if wanted is None or any(h.serves(r) for r in wanted)
    ]


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def state_files(kind: str, state_dir: Path = STATE_DIR) -> dict[str, Path]:
    """Run id -> saved-state file of one kind (ksm, swap, offline) in the state folder."""
    if not state_dir.exists():
        return {}
    return {p.stem.removeprefix(f"{kind}-"): p for p in sorted(state_dir.glob(f"{kind}-*.json"))}


def trace_tags(state_dir: Path = STATE_DIR) -> set[str]:
    """Tags of our trace instances and kprobe groups present now (no tracefs: none)."""
    if "tracefs" not in read_text(PROC / "filesystems"):
        return set()
    tags = set()
    with tracefs(state_dir) as root:
        for inst in (root / "instances").glob(TRACE_INSTANCE_PREFIX + "*"):
            tags.add(inst.name.removeprefix(TRACE_INSTANCE_PREFIX))
        kprobes = root / "kprobe_events"
        if kprobes.exists():
            for line in read_text(kprobes).splitlines():
                m = re.match(r"^[pr]:" + KPROBE_GROUP_PREFIX + r"(\w+)/", line)
                if m:
                    tags.add(m.group(1))
    return tags


def clean_tracing(
    state_dir: Path = STATE_DIR, run_ids: Iterable[str] | None = None, tags: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Remove trace instances and kprobe events a killed collector left (all, or those
    of the given runs: their tag is the run id with '_' for '-'; or the given tags)."""
    wanted = None if run_ids is None else {r.replace("-", "_") for r in run_ids} | set(tags)
    removed: list[str] = []
    errors: list[str] = []
    if "tracefs" not in read_text(PROC / "filesystems"):
        return removed, errors
    with tracefs(state_dir) as root:
        for inst in sorted((root / "instances").glob(TRACE_INSTANCE_PREFIX + "*")):
            if wanted is not None and inst.name.removeprefix(TRACE_INSTANCE_PREFIX) not in wanted:
                continue
            with contextlib.suppress(OSError):
                for enable in inst.glob("events/*/*/enable"):
                    if enable.read_text().strip() == "1":
                        enable.write_text("0")
            try:
                remove_trace_instance(inst)
                removed.append(f"trace instance {inst.name}")
            except AgentError as e:
                errors.append(str(e))
        kprobes = root / "kprobe_events"
        groups = set()
        if kprobes.exists():
            for line in read_text(kprobes).splitlines():
                m = re.match(r"^[pr]:(" + KPROBE_GROUP_PREFIX + r"\w+)/", line)
                if m and (wanted is None or m.group(1).removeprefix(KPROBE_GROUP_PREFIX) in wanted):
                    groups.add(m.group(1))
        for g in sorted(groups):
            remove_kprobes(root, g)
            removed.append(f"kprobe events {g}")
    return removed, errors


def clean_ksm(run_id: str, state_dir: Path = STATE_DIR) -> tuple[list[str], list[str]]:
    """Put back the KSM knobs a run saved before its settings took effect."""
    saved = state_files("ksm", state_dir).get(run_id)
    if saved is None:
        return [], []
    errors = restore_ksm(saved)
    return ([] if errors else [f"KSM settings of run {run_id} (restored from {saved})"]), errors


def clean_swap(run_id: str, state_dir: Path = STATE_DIR) -> tuple[list[str], list[str]]:
    saved = state_files("swap", state_dir).get(run_id)
    if saved is None:
        return [], []
    errors = swap_off(saved)
    return ([] if errors else [f"swap of run {run_id}"]), errors


def clean_offline(run_id: str, state_dir: Path = STATE_DIR) -> tuple[list[str], list[str]]:
    """Online a memory block a killed migration left offline."""
    saved = state_files("offline", state_dir).get(run_id)
    if saved is None:
        return [], []
    block = json.loads(read_text(saved))["block"]
    try:
        write_text(MEMORY_BLOCKS / f"memory{block}" / "state", "online")
        saved.unlink()
    except AgentError as err:
        return [], [str(err)]
    return [f"memory block {block} back online (run {run_id})"], []


def our_cgroups() -> dict[str, Path]:
    """Run id -> each memory cgroup densitylab made for a run (v1 and v2 roots)."""
    found: dict[str, Path] = {}
    for root in (Path("/sys/fs/cgroup/memory"), cgroup2_root(read_text(PROC / "self" / "mounts"))):
        for cg in sorted(root.glob("densitylab-*")) if root and root.exists() else []:
            found.setdefault(cg.name.removeprefix("densitylab-"), cg)
    return found


def clean_cgroups(run_id: str) -> tuple[list[str], list[str]]:
    """Stop the processes in a run's cgroups (host workloads), then remove them."""
    removed: list[str] = []
    errors: list[str] = []
    for root in (Path("/sys/fs/cgroup/memory"), cgroup2_root(read_text(PROC / "self" / "mounts"))):
        cg = root / f"densitylab-{run_id}" if root else None
        if cg is None or not cg.is_dir():
            continue
        for pid in read_text(cg / "cgroup.procs").split():
            kill_pid(int(pid))
        try:
            memcg_remove(cg)
            removed.append(f"cgroup {cg}")
        except AgentError as err:
            errors.append(str(err))
    return removed, errors


def clean_run_state(run_id: str, state_dir: Path = STATE_DIR) -> tuple[list[str], list[str]]:
    """Everything of one run the host agent made: KSM knobs, swap, offline memory
    blocks, trace probes, cgroups; returns (removed, errors), going on past errors."""
    removed: list[str] = []
    errors: list[str] = []
    for step in (clean_ksm, clean_swap, clean_offline):
        r, e = step(run_id, state_dir)
        removed += r
        errors += e
    for r, e in (clean_tracing(state_dir, [run_id]), clean_cgroups(run_id)):
        removed += r
        errors += e
    return removed, errors


def unmount_our_tracefs(state_dir: Path = STATE_DIR) -> tuple[list[str], list[str]]:
    """Unmount the tracefs we mounted on our own mount point, if it is still mounted."""
    mnt = state_dir / "tracefs"
    mounts = read_text(PROC / "self" / "mounts").splitlines()
    if not any(ln.split()[1:3] == [str(mnt), "tracefs"] for ln in mounts):
        return [], []
    cp = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
    return ([f"tracefs mount {mnt}"], []) if cp.returncode == 0 else ([], [f"tracefs mount {mnt}"])
