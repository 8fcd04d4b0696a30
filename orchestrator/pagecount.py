"""The workload's KSM saving counted page by page, instead of a before/after difference.

The scramble method (runner.attribute_saving) takes the merge's total sharing minus what
stays after the workload's pages are rewritten. Its residual also catches boot leftovers
that merge in the same window (measured: up to +2,060 pages per guest within one scan),
so the demo read 0-6% below the prediction. This module asks the kernels instead:

1. in each guest, dlfill's region (its DONE line gives pid, address, pages):
   /proc/PID/pagemap read through the guest agent gives each page's guest frame (GFN);
2. on the host, the guest's RAM is one anonymous mapping of QEMU (found in
   /proc/QEMU_PID/maps by its size); a small guest's RAM sits below 4 GiB, where guest
   physical address x lives at mapping start + x;
3. /proc/QEMU_PID/pagemap gives the host frame (PFN) of each such address, and
   /proc/kpageflags (KPF_KSM, bit 21; KPF_ZERO_PAGE, bit 24) and /proc/kpagecount (how
   many page tables map the frame, host-wide) say what that frame is.

The saving of one KSM frame mapped by `w` workload pages and `c` mappings in all is the
workload's marginal share of it: `w - 1` when only workload pages map it, `w` when other
pages map it too (their saving stays when the workload's leaves). A frame mapped once
saves nothing, so a kernel that flags plain anonymous pages KSM (Debian's 6.12 does, see
images/checks/dlcheck.c) still gives the right saving. A zero page (use_zero_pages)
saves one page each.

Only this machine's guests (the fleet's QEMU processes); lab hosts are not covered.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from orchestrator.errors import DensitylabError, HostError

log = logging.getLogger(__name__)

METHOD = "pagemap"  # the name the run store gives this measurement
PAGE_BYTES = 4096
PAGES_PER_MIB = (1 << 20) // PAGE_BYTES
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1
KPF_KSM = 21
KPF_ZERO_PAGE = 24
# QEMU puts guest RAM below 4 GiB up to 2-3 GiB (pc, q35): linear GPA -> HVA only there.
LOW_RAM_LIMIT_MIB = 2048
# The RAM block can be rounded up by QEMU (alignment); never by more than this.
RAM_SLACK_BYTES = 4 << 20
AGENT_READ_BYTES = 256 << 10
MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$")

AgentCall = Callable[[str, dict[str, object]], object]


class PageCountError(HostError):
    """A guest's pages could not be followed to the host's frames."""

    def __init__(self, guest: str, why: str):
        self.guest = guest
        self.why = why
        super().__init__(f"pagecount {guest}: {why}")


@dataclass(frozen=True)
class Region:
    """One guest's workload: where dlfill's pages are (guest virtual) and which QEMU."""

    guest: str
    qemu_pid: int
    guest_pid: int
    addr: int
    pages: int
    memory_mib: int


@dataclass(frozen=True)
class GuestCount:
    """What one guest's workload pages are on the host, in pages."""

    guest: str
    pages: int
    guest_present: int
    host_present: int
    ksm_pages: int
    zero_pages: int
    saving_pages: float


# ---------------------------------------------------------------- parsing


def decode_pagemap(data: bytes) -> list[int | None]:
    """Pagemap entries as frame numbers; None where the page is not present (swapped,
    never touched, or the frame hidden from an unprivileged reader: PFN 0)."""
    if len(data) % 8:
        raise ValueError(f"pagemap data of {len(data)} bytes is not whole entries")
    out: list[int | None] = []
    for (e,) in struct.iter_unpack("<Q", data):
        pfn = e & PM_PFN_MASK
        out.append(pfn if e & PM_PRESENT and pfn else None)
    return out


def ram_mapping(maps_text: str, memory_mib: int) -> int:
    """Start address of QEMU's guest-RAM mapping: the one private anonymous read-write
    mapping of the guest's RAM size (up to RAM_SLACK_BYTES larger).

    Raises ValueError when none or several match: a guess would count the wrong pages."""
    want = memory_mib << 20
    found = []
    for line in maps_text.splitlines():
        m = MAPS_LINE.match(line)
        if not m:
            continue
        start, end, perms, inode, path = m.groups()
        size = int(end, 16) - int(start, 16)
        anon = inode == "0" and not path.strip()
        if anon and perms.startswith("rw") and want <= size <= want + RAM_SLACK_BYTES:
            found.append(int(start, 16))
    if len(found) != 1:
        raise ValueError(
            f"{len(found)} anonymous rw mappings of {memory_mib} MiB (+{RAM_SLACK_BYTES >> 20}"
            " MiB) in QEMU's maps, want exactly 1"
        )
    return found[0]


def attribute(
    frames: Mapping[str, Sequence[int | None]],
    flags: Mapping[int, int],
    counts: Mapping[int, int],
    guest_present: Mapping[str, int] | None = None,
) -> list[GuestCount]:
    """Each guest's share of the saving, from the host frames of its workload pages.

    frames: guest -> host PFN per workload page (None: not present on the host);
    flags/counts: /proc/kpageflags and /proc/kpagecount per PFN. A frame's saving
    (module docstring) is split among the guests by their mappings of it."""
    workload = Counter(p for fs in frames.values() for p in fs if p is not None)

    def saving(pfn: int) -> float:
        f = flags.get(pfn, 0)
        if f >> KPF_ZERO_PAGE & 1:
            return float(workload[pfn])  # each mapping of the zero page saves its page
        if not f >> KPF_KSM & 1:
            return 0.0
        w = workload[pfn]
        return float(w - 1 if counts.get(pfn, w) <= w else w)

    per_frame = {p: saving(p) / workload[p] for p in workload}
    out = []
    for guest, fs in frames.items():
        present = [p for p in fs if p is not None]
        out.append(
            GuestCount(
                guest=guest,
                pages=len(fs),
                guest_present=(guest_present or {}).get(guest, len(fs)),
                host_present=len(present),
                ksm_pages=sum(flags.get(p, 0) >> KPF_KSM & 1 for p in present),
                zero_pages=sum(flags.get(p, 0) >> KPF_ZERO_PAGE & 1 for p in present),
                saving_pages=sum(per_frame[p] for p in present),
            )
        )
    return out


def table(trial_id: str, counts: Sequence[GuestCount]) -> pd.DataFrame:
    """The per-guest figures, one row per guest (run store table `workload_pages`)."""
    cols = ["trial_id", "guest", "method", "pages", "guest_present", "host_present",
            "ksm_pages", "zero_pages", "saving_pages", "saving_mib"]  # fmt: skip
    rows = [
        {
            "trial_id": trial_id,
            "method": METHOD,
            **asdict(c),
            "saving_mib": c.saving_pages / PAGES_PER_MIB,
        }
        for c in counts
    ]
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------- reading the kernels


def read_guest_pagemap(agent: AgentCall, guest: str, pid: int, addr: int, pages: int) -> bytes:
    """The guest's /proc/PID/pagemap entries for [addr, addr + pages) through the guest
    agent (open, seek, read): 8 bytes a page, ~320 KiB for 160 MiB."""
    path = f"/proc/{pid}/pagemap"
    handle = agent(guest, {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}})
    out = bytearray()
    try:
        offset = addr // PAGE_BYTES * 8
        agent(
            guest,
            {
                "execute": "guest-file-seek",
                "arguments": {"handle": handle, "offset": offset, "whence": "set"},
            },
        )
        while len(out) < pages * 8:
            want = min(AGENT_READ_BYTES, pages * 8 - len(out))
            r = agent(
                guest,
                {"execute": "guest-file-read", "arguments": {"handle": handle, "count": want}},
            )
            chunk = base64.b64decode(r.get("buf-b64", "")) if isinstance(r, dict) else b""
            if not chunk:
                raise PageCountError(guest, f"{path}: short read at byte {len(out)}")
            out += chunk
    finally:
        agent(guest, {"execute": "guest-file-close", "arguments": {"handle": handle}})
    return bytes(out)


def pread_all(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, size - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def host_frames(
    region: Region, gfns: Sequence[int | None], proc: Path = Path("/proc")
) -> list[int | None]:
    """Host PFN of each guest frame, through QEMU's RAM mapping and pagemap."""
    if region.memory_mib > LOW_RAM_LIMIT_MIB:
        raise PageCountError(
            region.guest, f"{region.memory_mib} MiB of RAM: GPA -> HVA is linear below 2 GiB only"
        )
    try:
        start = ram_mapping((proc / str(region.qemu_pid) / "maps").read_text(), region.memory_mib)
    except ValueError as e:
        raise PageCountError(region.guest, str(e)) from e
    ram_pages = region.memory_mib * PAGES_PER_MIB
    data = pread_all(
        proc / str(region.qemu_pid) / "pagemap", start // PAGE_BYTES * 8, ram_pages * 8
    )
    host = decode_pagemap(data)
    return [host[g] if g is not None and g < len(host) else None for g in gfns]


def read_words(path: Path, pfns: Sequence[int]) -> dict[int, int]:
    """One 64-bit word per PFN from /proc/kpageflags or /proc/kpagecount."""
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for pfn in sorted(set(pfns)):
            b = os.pread(fd, 8, pfn * 8)
            out[pfn] = struct.unpack("<Q", b)[0] if len(b) == 8 else 0
    finally:
        os.close(fd)
    return out


def measure(
    regions: Sequence[Region], agent: AgentCall, proc: Path = Path("/proc")
) -> list[GuestCount]:
    """Follow every guest's workload pages to the host and count their KSM saving.

    Raises PageCountError (a guest's pages could not be followed) or HostError."""
    frames: dict[str, list[int | None]] = {}
    present: dict[str, int] = {}
    for r in regions:
        gfns = decode_pagemap(read_guest_pagemap(agent, r.guest, r.guest_pid, r.addr, r.pages))
        present[r.guest] = sum(g is not None for g in gfns)
        if present[r.guest] == 0:  # PFNs hidden (not root) or nothing faulted: no figure
            raise PageCountError(r.guest, "no workload page has a guest frame in pagemap")
        frames[r.guest] = host_frames(r, gfns, proc)
    pfns = [p for fs in frames.values() for p in fs if p is not None]
    flags = read_words(proc / "kpageflags", pfns)
    ksm = [p for p in set(pfns) if flags[p] >> KPF_KSM & 1]
    counts = read_words(proc / "kpagecount", ksm)
    return attribute(frames, flags, counts, present)


def total_saving_mib(counts: Sequence[GuestCount]) -> float:
    return sum(c.saving_pages for c in counts) / PAGES_PER_MIB


def measure_or_none(
    regions: Sequence[Region], agent: AgentCall, proc: Path = Path("/proc")
) -> list[GuestCount] | None:
    """measure(), or None with a warning: the scramble figure still stands without it."""
    try:
        return measure(regions, agent, proc)
    except (DensitylabError, OSError) as e:
        log.warning("no per-page saving (%s): the report uses the scramble figure", e)
        return None


# ---------------------------------------------------------------- a trial


class HasSaving(Protocol):
    pagecount_saving_mib: float | None
    saving_method: str | None


def regions_of(guests: Sequence[Any], fills: Sequence[Any]) -> list[Region]:
    """The fleet's guests (fleet.Guest) with their dlfill region (workload.FillResult);
    guests without a QEMU pid or a region (an older dlfill) are left out."""
    by_name = {f.guest: f for f in fills}
    out = []
    for g in guests:
        f = by_name.get(g.name)
        if g.pid is None or f is None or f.dlfill_pid is None or f.region_addr is None:
            continue
        out.append(Region(g.name, g.pid, f.dlfill_pid, f.region_addr, f.pages, g.spec.memory_mib))
    return out


def record(st: Any, trial_id: str, fl: Any, fills: Sequence[Any], res: HasSaving) -> None:
    """Count the workload's saving page by page now (the merge has settled) into res and
    the trial's `workload_pages` table; nothing when a guest cannot be followed.

    st: the run store; fl: the fleet (its guests and guest agent)."""
    regions = regions_of(fl.guests, fills)
    if not regions or len(regions) != len(fills):
        log.warning("no per-page saving: %d of %d guests have a region", len(regions), len(fills))
        return
    t0 = time.monotonic()
    counts = measure_or_none(regions, fl.agent)
    if counts is None:
        return
    log.info("pagecount: %.1f MiB saved by the workload, counted in %.1f s",
             total_saving_mib(counts), time.monotonic() - t0)  # fmt: skip
    res.pagecount_saving_mib = total_saving_mib(counts)
    res.saving_method = METHOD
    st.write_trial_tables(trial_id, {"workload_pages": table(trial_id, counts)})
