"""Capability probes: what this host can do, each fact with how it was found (what
`densitylab doctor` prints and what a trial's method choices rest on)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import cmd
from .fs import PROC, read_text
from .ksm import KSM_DIR, read_ksm_counters, read_ksm_knobs
from .memory import cgroup2_root
from .sample import read_meminfo_kib
from .trace import tracefs


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


def bpf_fentry_allowed(timeout_s: float = 30) -> tuple[bool, str]:
    """Attach an fentry probe to rmap_walk_ksm with bpftrace and detach at once."""
    prog = "kfunc:rmap_walk_ksm { } interval:ms:200 { exit(); }"
    try:
        cp = cmd.run(["bpftrace", "-e", prog], timeout_s=timeout_s, check=False)
    except cmd.AgentCommandError as e:
        if e.rc == 127:
            return False, "bpftrace not installed"
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
