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
    `densitylab clean` after kill -9) can always put the host back. Returns the saved
    values. Raises AgentError naming the knob on an unknown or unwritable knob.
    """
    known = set(ksm_knob_names(ksm_dir))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise AgentError(f"{ksm_dir}: no writable KSM knob {', '.join(unknown)} on this kernel")
    current = read_ksm_knobs(ksm_dir)
    saved = {k: current[k] for k in settings}
    saved.setdefault("run", current.get("run", "0"))
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


def read_process_ksm(pid: int, proc: Path = PROC) -> dict[str, int]:
    """Per-process KSM figures (/proc/PID/ksm_stat) and its mergeable VMA count."""
    base = proc / str(pid)
    stat = parse_key_values(read_text(base / "ksm_stat")) if (base / "ksm_stat").exists() else {}
    out = {k: stat[k] for k in PROCESS_KSM_FIELDS if k in stat}
    out["ram_vmas"] = count_mergeable_vmas(read_text(base / "smaps"))
    return out


def sample_once(
    pids: Mapping[str, int], ksmd_pid: int | None, ksm_dir: Path = KSM_DIR, proc: Path = PROC
) -> dict[str, Any]:
    """One sample of everything, stamped with CLOCK_MONOTONIC ns. Gone processes are skipped."""
    sample: dict[str, Any] = {"ts_ns": time.monotonic_ns(), "ksm": read_ksm_counters(ksm_dir)}
    sample["ksmd_cpu_s"] = process_cpu_s(ksmd_pid, proc) if ksmd_pid else None
    sample["vmstat"] = read_vmstat(proc)
    sample["meminfo_kib"] = read_meminfo_kib(proc)
    procs: dict[str, Any] = {}
    for name, pid in pids.items():
        with contextlib.suppress(AgentError):
            procs[name] = {"pid": pid, **read_process_ksm(pid, proc)}
    sample["processes"] = procs
    return sample


def run_sampler(
    pids: Mapping[str, int],
    interval_s: float,
    out: Path,
    stop_after_s: float | None = None,
    parent_pid: int | None = None,
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
    start = time.monotonic()
    next_tick = start
    with open(out, "a") as f:
        while not stopping:
            f.write(json.dumps(sample_once(pids, ksmd)) + "\n")
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
    r = sub.add_parser("ksm-restore", help="restore KSM knobs saved by ksm-apply")
    r.add_argument("--saved", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "probe":
            print(json.dumps(probe_host(check_bpf=not args.no_bpf), indent=2))
        elif args.cmd == "sample":
            pids = {k: int(v) for k, v in (x.split("=", 1) for x in args.pid)}
            run_sampler(pids, args.interval_s, args.out, args.stop_after_s, args.parent_pid)
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


def find_samplers(proc: Path = PROC) -> list[int]:
    """Pids of host-agent samplers still running (their orchestrator may be gone)."""
    me = os.getpid()
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        with contextlib.suppress(OSError):
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"hostagent.py") for a in argv) and b"sample" in argv:
                found.append(int(d.name))
    return found


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def clean_host_state(
    run_ids: Iterable[str] | None = None, state_dir: Path = STATE_DIR
) -> tuple[list[str], list[str]]:
    """Restore saved KSM knobs and unmount our tracefs; returns (removed, errors)."""
    wanted = set(run_ids) if run_ids is not None else None
    removed: list[str] = []
    errors: list[str] = []
    for saved in sorted(state_dir.glob("ksm-*.json")) if state_dir.exists() else []:
        run_id = saved.stem.removeprefix("ksm-")
        if wanted is not None and run_id not in wanted:
            continue
        errs = restore_ksm(saved)
        errors += errs
        if not errs:
            removed.append(f"KSM settings of run {run_id} (restored from {saved})")
    mnt = state_dir / "tracefs"
    mounts = read_text(PROC / "self" / "mounts").splitlines()
    if any(ln.split()[1:3] == [str(mnt), "tracefs"] for ln in mounts):
        cp = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
        (removed if cp.returncode == 0 else errors).append(f"tracefs mount {mnt}")
    return removed, errors
