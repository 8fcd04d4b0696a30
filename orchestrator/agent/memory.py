"""Memory: swap (zram or a file), memory cgroups (v1 and v2) and reclaim, memory
blocks, move_pages(2) and compaction."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import cmd
from .fs import PROC, AgentError, read_text, write_json_atomic, write_text


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
        cmd.run(argv, timeout_s=120)
    return target


def swap_off(saved_path: Path) -> list[str]:
    """Undo swap_on: swapoff, reset zram or delete the file; returns errors."""
    data = json.loads(read_text(saved_path))
    target = data["device"]
    errors = []
    active = [ln.split()[0] for ln in read_text(PROC / "swaps").splitlines()[1:] if ln.strip()]
    if target in active:
        try:
            cmd.run(["swapoff", target], timeout_s=600)
        except cmd.AgentCommandError as e:
            errors.append(str(e))
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


def cgroup2_root(mounts_text: str) -> Path | None:
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None
