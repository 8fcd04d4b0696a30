"""Capability probes: what this host can do, each fact with how it was found (what
`densitylab doctor` prints and what a trial's method choices rest on)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import bpf
from .fs import PROC, read_text
from .ksm import KSM_DIR, read_ksm_counters, read_ksm_knobs
from .memory import cgroup2_root
from .sample import read_meminfo_kib
from .trace import METHODS, RMAP_WALK_EVENT, tracefs


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


def probe_tracing(check_bpf: bool = True) -> dict[str, Any]:
    """Methods that can time rmap_walk_ksm here, cheapest exact one first (the default),
    with why the others cannot: the series' own walk tracepoint, BPF fentry/fexit,
    kprobes, and the migration-only lower-bound proxy."""
    found: dict[str, str] = {}
    notes: dict[str, str] = {}
    tracefs_ok = "tracefs" in read_text(PROC / "filesystems")
    if tracefs_ok:
        with tracefs() as root:
            tracefs_methods(root, found, notes)
    else:
        for m in ("tracepoint", "kprobe", "tracepoint-proxy"):
            notes[m] = "tracefs not in /proc/filesystems"
    if check_bpf:
        ok, why = bpf.fentry_allowed("rmap_walk_ksm")
        (found if ok else notes)["bpf-fentry"] = why
    else:
        notes["bpf-fentry"] = "not probed (--no-bpf)"
    methods = [m for m in METHODS if m in found]
    how = "; ".join(f"{k}: {v}" for k, v in sorted({**notes, **found}.items()))
    return fact(methods, how, methods=methods)


def tracefs_methods(root: Path, found: dict[str, str], notes: dict[str, str]) -> None:
    """The tracefs-based methods of this kernel, into found (usable) or notes (not)."""
    walk = root / "events" / RMAP_WALK_EVENT
    if walk.is_dir():
        found["tracepoint"] = f"{walk} exists (the walk with its duration)"
    else:
        notes["tracepoint"] = f"{walk} absent (kernel without the rmap walk tracepoint)"
    if (root / "kprobe_events").exists():
        found["kprobe"] = f"{root}/kprobe_events exists"
    else:
        notes["kprobe"] = f"{root}/kprobe_events absent (no CONFIG_KPROBE_EVENTS or locked down)"
    proxy = root / "events" / "migrate" / "set_migration_pte"
    if proxy.exists():
        found["tracepoint-proxy"] = f"{proxy} exists (lower bound, migration only)"
    else:
        notes["tracepoint-proxy"] = f"{proxy} absent"


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
