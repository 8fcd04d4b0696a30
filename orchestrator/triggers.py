"""Reclaim and migration triggers, host-side workloads, and the latency method choice.

Everything here acts through the host agent (cgroups, swap, compaction) or plain
processes (dlfill, migratepages); each step registers its undo on the caller's stack.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import dlfill, images, proc
from orchestrator.agent import enough, fs, memory
from orchestrator.agent.enough import stop_detail
from orchestrator.attribution import Window
from orchestrator.errors import HostError
from orchestrator.spec import HostWorkload, Migrate, Reclaim

log = logging.getLogger(__name__)

MIB = 1 << 20
EventFn = Callable[[str, str], None]  # (event, detail)


# ---------------------------------------------------------------- latency method


@dataclass(frozen=True)
class LatencyPlan:
    """Which collector runs, and why some trigger has no latency figure."""

    method: str | None
    notes: dict[str, str] = field(default_factory=dict)

    def covers(self, trigger: str) -> bool:
        return self.method is not None and trigger not in self.notes


def pick_latency(requested: str, probed: list[str], triggers: list[str]) -> LatencyPlan:
    """The best method the host allows (or the one asked for), with what it cannot cover."""
    if requested == "none" or not triggers:
        return LatencyPlan(None, {t: "latency not requested" for t in triggers})
    if requested != "auto" and requested not in probed:
        raise HostError(
            f"latency.method: {requested} is not available here "
            f"(available: {', '.join(probed) or 'none'})"
        )
    method = requested if requested != "auto" else (probed[0] if probed else None)
    if method is None:
        return LatencyPlan(None, {t: "no tracing method on this host" for t in triggers})
    notes = {}
    if method == "tracepoint-proxy" and "reclaim" in triggers:
        notes["reclaim"] = (
            "unavailable here: the tracepoint proxy sees migration only "
            "(needs kprobes or BPF fentry on rmap_walk_ksm)"
        )
    return LatencyPlan(method, notes)


# ---------------------------------------------------------------- host workload


@dataclass
class HostProcess:
    pid: int
    popen: proc.Popen[bytes]
    done: dict[str, Any]
    out: Path


def scramble_host_workload(procs: list[HostProcess], timeout_s: float = 120) -> None:
    """SIGUSR1 each host dlfill (its pages become unique) and wait for its confirmation."""
    before = {p.pid: p.out.read_text().count("DLFILL SCRAMBLED") for p in procs}
    for p in procs:
        p.popen.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while p.out.read_text().count("DLFILL SCRAMBLED") <= before[p.pid]:
            if time.monotonic() > deadline or p.popen.poll() is not None:
                raise HostError(f"host dlfill {p.pid} did not confirm the scramble")
            time.sleep(0.05)


def start_host_workload(
    w: HostWorkload,
    vmas: int,
    seed: int,
    run_id: str,
    stack: ExitStack,
    out_dir: Path,
    timeout_s: float = 120,
) -> list[HostProcess]:
    """Start `copies` dlfill processes (same seed, so their pages merge across them),
    fragmented into `vmas` VMAs, in a memory cgroup of ours."""
    if w.copies == 0:
        return []
    dlfill = images.host_dlfill()
    mounts = fs.read_text(fs.PROC / "self" / "mounts")
    cg = memory.memcg_create(f"densitylab-{run_id}", mounts)
    stack.callback(memory.memcg_remove, cg)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(w.copies):
        out = out_dir / f"host-dlfill-{i}.out"
        with open(out, "wb") as f:
            p = proc.spawn_group(
                images.fragmented_copy_argv(
                    str(dlfill), w.mib, vmas, seed, i, one_content=w.pattern == "one-content"
                ),
                stdout=f.fileno(),
                # Join the cgroup before exec: memory is charged where it is first
                # touched, and moving a process later does not move its charge (v1).
                preexec=lambda: memory.memcg_add_pid(cg, os.getpid()),
            )
        stack.callback(proc.stop_group, p)
        procs.append(HostProcess(p.pid, p, wait_done(out, p, timeout_s), out))
    return procs


def wait_done(out: Path, p: proc.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (done := dlfill.done_record(out.read_text())) is not None:
            return done
        if p.poll() is not None:
            raise HostError(f"host dlfill exited {p.returncode} before filling")
        time.sleep(0.05)
    raise HostError(f"host dlfill not done within {timeout_s:.0f}s")


# ---------------------------------------------------------------- migration


def migrate_once(
    cfg: Migrate,
    numa_nodes: int,
    targets: dict[str, int],
    repeat: int,
    event: EventFn,
    run_id: str,
    watch: enough.WatchFactory | None = None,
) -> list[Window]:
    """One migration pass: NUMA migrate_pages between nodes (one process at a time, each
    in a window of its own), memory-block offline/online of the blocks holding the
    mergeable memory, or host-wide compaction (neither of which can say whose page a
    walk was for: no windows). `targets` maps workload names to pids."""
    method = cfg.method if cfg.method != "auto" else ("numa" if numa_nodes >= 2 else "compaction")
    pids = list(targets.values())
    if method == "offline":
        offline_blocks(pids, run_id, event)
        return []
    if method != "numa":
        t0 = time.monotonic()
        memory.compact_memory()
        event("compacted", f"{time.monotonic() - t0:.2f}s")
        return []
    if numa_nodes < 2:
        raise HostError("phases.migrate.method: numa needs two NUMA nodes, host has one")
    src, dst = (0, 1) if repeat % 2 == 0 else (1, 0)
    windows = []
    for name, pid in targets.items():
        start = time.monotonic_ns()
        if cfg.pages is None:
            proc.run(["migratepages", str(pid), str(src), str(dst)], timeout_s=600)
        else:
            addrs = memory.sample_page_addresses(memory.mergeable_ranges(pid), cfg.pages)
            moved = enough.move_until_tight(pid, addrs, dst, watch() if watch else None)
            if "stopped" in moved:
                event("migrated-process", f"{name}: {stop_detail(moved)}")
        windows.append(Window(start, time.monotonic_ns(), name, "migrate"))
    event("migrated", f"numa {src}->{dst} for {len(pids)} processes")
    return windows


def offline_blocks(pids: list[int], run_id: str, event: EventFn) -> None:
    """Migrate exactly the pages of interest: offline (then online) each memory block
    holding mergeable pages of these processes. Compaction only moves what lies below
    its scanners' meeting point, so on a compacted host it may move nothing of ours.

    A block with one unmovable page cannot go offline; once the kernel has scattered
    unmovable allocations over every block holding ours (seen here after hours of
    runs), this falls back to compaction and says so in the events."""
    blocks = memory.memory_blocks_of(pids)
    saved = fs.STATE_DIR / f"offline-{run_id}.json"
    t0 = time.monotonic()
    done = [b for b in sorted(blocks) if memory.offline_online_block(b, saved)]
    refused = len(blocks) - len(done)
    if not done:
        event(
            "offline-refused",
            f"all {len(blocks)} memory blocks holding our pages have "
            "unmovable pages: falling back to compaction",
        )
        memory.compact_memory()
        event("compacted", f"{time.monotonic() - t0:.2f}s (fallback)")
        return
    event(
        "offlined",
        f"{len(done)} memory blocks in {time.monotonic() - t0:.2f}s"
        + (f", {refused} refused (unmovable pages)" if refused else ""),
    )


# ---------------------------------------------------------------- reclaim


def memory_cgroups(targets: dict[str, int]) -> list[tuple[Path, list[str]]]:
    """The memory cgroups holding mergeable memory with the workloads in each, largest
    usage first.

    A KSM page stays charged to the cgroup of the page KSM kept, which for pages merged
    across guests can be any of them: each cgroup is reclaimed in turn."""
    mounts = fs.read_text(fs.PROC / "self" / "mounts")
    cgs: dict[Path, list[str]] = {}
    for name, pid in targets.items():
        cgs.setdefault(memory.memory_cgroup_of(pid, mounts), []).append(name)
    if not cgs:
        raise HostError("no process to reclaim from")
    return sorted(cgs.items(), key=lambda kv: memory.memcg_usage_bytes(kv[0]), reverse=True)


def window_target(names: list[str]) -> str:
    """The target name of a window acting on several workloads at once (one cgroup)."""
    return names[0] if len(names) == 1 else "+".join(sorted(names))


def provide_swap(cfg: Reclaim, run_id: str, stack: ExitStack, event: EventFn) -> None:
    saved = fs.STATE_DIR / f"swap-{run_id}.json"
    try:
        dev = memory.swap_on(cfg.swap, cfg.swap_mib, saved)
    except fs.AgentError as e:
        if saved.exists():
            memory.swap_off(saved)
        raise HostError(f"phases.reclaim.swap: {e}") from e

    def off() -> None:
        errors = memory.swap_off(saved)
        if errors:
            raise HostError("; ".join(errors))

    stack.callback(off)
    event("swap-on", f"{cfg.swap} {dev} {cfg.swap_mib} MiB")


# Measured on a 6.18 host: the first write of a lower limit often fails with EBUSY while
# referenced KSM pages are being aged; after a 0.2 s pause a retry goes through.
V1_STEP_TRIES = 10
V1_RETRY_PAUSE_S = 0.2


def reclaim_once(
    cfg: Reclaim,
    cgroup_kind: str,
    targets: dict[str, int],
    stack: ExitStack,
    event: EventFn,
    watch: enough.WatchFactory | None = None,
) -> list[Window]:
    """Reclaim from every cgroup holding mergeable memory, one at a time in a window of
    its own: v2 memory.reclaim, or v1 limits stepped down (and put back)."""
    windows = []
    for cg, names in memory_cgroups(targets):
        method = cfg.method
        if method == "auto":
            method = "memory.reclaim" if (cg / "memory.reclaim").exists() else "v1-limit-steps"
        start = time.monotonic_ns()
        if method == "memory.reclaim":
            reclaim_v2(cg, cfg, cgroup_kind, event, watch() if watch else None)
        else:
            reclaim_v1_steps(cg, cfg, stack, event)
        windows.append(Window(start, time.monotonic_ns(), window_target(names), "reclaim"))
    return windows


def reclaim_v2(
    cg: Path, cfg: Reclaim, cgroup_kind: str, event: EventFn, watch: enough.WalkWatch | None
) -> None:
    if not (cg / "memory.reclaim").exists():
        raise HostError(
            f"phases.reclaim.method: {cg}/memory.reclaim does not exist here (cgroup {cgroup_kind})"
        )
    got = enough.reclaim_until_tight(cg, cfg.reclaim_mib * MIB, watch)
    how = "all" if got["result"] == "all" else "partly (EAGAIN)"
    if "stopped" in got:
        how += f"; {stop_detail(got)}"
    event("reclaimed", f"{cg.name} memory.reclaim {cfg.reclaim_mib} MiB ({how})")


V1_CREEP_MIB = 8


def set_limit_v1(cg: Path, nbytes: int) -> bool:
    """Try a v1 limit a few times, pausing between tries; the kernel gives up with EBUSY
    when it cannot reclaim enough in one go, and each retry reclaims more."""
    for attempt in range(V1_STEP_TRIES):
        if attempt:
            time.sleep(V1_RETRY_PAUSE_S)
        try:
            memory.memcg_set_limit_v1(cg, nbytes)
            return True
        except fs.AgentError:
            continue
    return False


def reclaim_v1_steps(cg: Path, cfg: Reclaim, stack: ExitStack, event: EventFn) -> None:
    """Step the v1 limit down. A step the kernel refuses (EBUSY) is approached from the
    cgroup's usage in 8 MiB decrements: one big step fails where small ones go through."""
    original = fs.read_text(cg / "memory.limit_in_bytes").strip()
    stack.callback(memory.memcg_set_limit_v1, cg, original)
    for step in cfg.v1_limit_steps_mib:
        if set_limit_v1(cg, step * MIB):
            event("limit-step", f"{cg.name} {step} MiB")
            continue
        limit = memory.memcg_usage_bytes(cg) // MIB
        while limit > step and set_limit_v1(cg, limit * MIB):
            limit = max(step, limit - V1_CREEP_MIB)
        if limit == step and set_limit_v1(cg, step * MIB):
            event("limit-step", f"{cg.name} {step} MiB (in {V1_CREEP_MIB} MiB decrements)")
        else:
            event("limit-step-failed", f"{cg.name} {step} MiB: EBUSY at {limit} MiB")
    memory.memcg_set_limit_v1(cg, original)
    event("limit-restored", cg.name)
