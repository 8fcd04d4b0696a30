"""What a killed run left on this host, found and removed: saved KSM knobs, swap,
offline memory blocks, trace instances and kprobe events, cgroups, our tracefs mount."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from . import cmd
from .fs import PROC, STATE_DIR, AgentError, read_text, write_text
from .ksm import restore_ksm
from .memory import MEMORY_BLOCKS, cgroup2_root, memcg_remove, swap_off
from .procs import kill_pid
from .trace import (
    KPROBE_GROUP_PREFIX,
    TRACE_INSTANCE_PREFIX,
    remove_kprobes,
    remove_trace_instance,
    tracefs,
)

# A run's tag: its id with '_' for '-' (e.g. 20261202_101500_demo_ab12).
TAG_RE = re.compile(r"^\d{8}_\d{6}_\w+$")


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
    for root in memcg_roots():
        for cg in sorted(root.glob("densitylab-*")):
            found.setdefault(cg.name.removeprefix("densitylab-"), cg)
    return found


def memcg_roots() -> list[Path]:
    """The memory cgroup hierarchies here: v1's memory controller, the v2 mount."""
    v2 = cgroup2_root(read_text(PROC / "self" / "mounts"))
    return [r for r in (Path("/sys/fs/cgroup/memory"), v2) if r is not None and r.exists()]


def remove_cgroup(cg: Path, removed: list[str], errors: list[str]) -> None:
    """Stop the processes in one of our cgroups (host workloads), then remove it."""
    for pid in read_text(cg / "cgroup.procs").split():
        kill_pid(int(pid))
    try:
        memcg_remove(cg)
        removed.append(f"cgroup {cg}")
    except AgentError as err:
        errors.append(str(err))


def clean_cgroups(run_id: str) -> tuple[list[str], list[str]]:
    """A run's cgroup (this host's naming: densitylab-RUN_ID), its processes stopped."""
    removed: list[str] = []
    errors: list[str] = []
    for root in memcg_roots():
        if (root / f"densitylab-{run_id}").is_dir():
            remove_cgroup(root / f"densitylab-{run_id}", removed, errors)
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
    try:
        cmd.run(["umount", str(mnt)], timeout_s=30)
    except cmd.AgentCommandError as e:
        return [], [str(e)]
    return [f"tracefs mount {mnt}"], []


# ---------------------------------------------------------------- a lab machine's sweep


def work_dirs(state_dir: Path = STATE_DIR) -> dict[str, Path]:
    """Run tag -> the folder of a run's trial files on a machine (samplers, collectors
    and workloads write their pidfiles there). Tags are run ids with '_' for '-'."""
    if not state_dir.is_dir():
        return {}
    return {d.name: d for d in sorted(state_dir.iterdir()) if d.is_dir() and TAG_RE.match(d.name)}


def stop_pidfiles(work: Path) -> list[str]:
    """SIGTERM every process a run's pidfiles name (agent spawn writes them)."""
    stopped = []
    for pidfile in sorted(work.rglob("*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().split()[0])
            kill_pid(pid)
            stopped.append(f"process {pid} ({pidfile.name})")
    return stopped


def sweep_machine(keep: str | None, state_dir: Path = STATE_DIR) -> tuple[list[str], list[str]]:
    """What `clean --inventory` does on each machine: everything densitylab runs left
    here (processes, cgroups, probes, swap, KSM knobs, trial files), except what the run
    `keep` (the machine's live holder) has. Oldest KSM save restored last: it stays."""
    keep_tag = keep.replace("-", "_") if keep else None
    removed: list[str] = []
    errors: list[str] = []
    for tag, work in work_dirs(state_dir).items():
        if tag != keep_tag:
            removed += stop_pidfiles(work)
            shutil.rmtree(work, ignore_errors=True)
            removed.append(f"trial files {work}")
    for root in memcg_roots():
        for cg in sorted(root.glob("densitylab-*")):
            owner = cg.name.removeprefix("densitylab-")  # RUN_ID here, TAG-NAME on a machine
            if not (keep and (owner == keep or owner.startswith(f"{keep_tag}-"))):
                remove_cgroup(cg, removed, errors)
    runs = {r for kind in ("ksm", "swap", "offline") for r in state_files(kind, state_dir)}
    for run_id in sorted(runs - {keep}, reverse=True):
        for step in (clean_ksm, clean_swap, clean_offline):
            r, e = step(run_id, state_dir)
            removed += r
            errors += e
    r, e = clean_tracing(state_dir, run_ids=[], tags=trace_tags(state_dir) - {keep_tag})
    removed += r
    errors += e
    if keep is None:
        r, e = unmount_our_tracefs(state_dir)
        removed += r
        errors += e
    return removed, errors
