"""orchestrator.pagecount: parsing QEMU's maps (recorded from a real 512 MiB TCG guest),
pagemap decoding against this process's own pagemap, and the saving rule per frame."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

import pytest

from orchestrator import pagecount
from orchestrator.pagecount import KPF_KSM, KPF_ZERO_PAGE, PM_PRESENT

DATA = Path(__file__).resolve().parent.parent / "data" / "qemu"
KSM = 1 << KPF_KSM
ZERO = 1 << KPF_ZERO_PAGE


def test_ram_mapping_of_a_recorded_qemu_is_its_512_mib_block() -> None:
    maps = (DATA / "maps-pc-i440fx-512mib.txt").read_text()
    assert pagecount.ram_mapping(maps, 512) == 0x7FF9D7E00000


def test_ram_mapping_refuses_a_size_it_cannot_find() -> None:
    maps = (DATA / "maps-pc-i440fx-512mib.txt").read_text()
    with pytest.raises(ValueError, match="0 anonymous rw mappings of 256 MiB"):
        pagecount.ram_mapping(maps, 256)


def test_ram_mapping_refuses_two_candidates() -> None:
    line = "7ff9d7e00000-7ff9f7e00000 rw-p 00000000 00:00 0 \n"
    other = "7ffa00000000-7ffa20000000 rw-p 00000000 00:00 0 \n"
    with pytest.raises(ValueError, match="2 anonymous"):
        pagecount.ram_mapping(line + other, 512)


def test_a_file_mapping_of_the_right_size_is_not_guest_ram() -> None:
    line = "7ff9d7e00000-7ff9f7e00000 rw-p 00000000 fd:01 1234 /dev/shm/ram\n"
    with pytest.raises(ValueError, match="0 anonymous"):
        pagecount.ram_mapping(line, 512)


def test_decode_pagemap_keeps_present_frames_only() -> None:
    raw = struct.pack("<QQQ", PM_PRESENT | 0x1234, 0x1234, PM_PRESENT)  # present, not, pfn 0
    assert pagecount.decode_pagemap(raw) == [0x1234, None, None]
    with pytest.raises(ValueError, match="not whole entries"):
        pagecount.decode_pagemap(b"\0" * 12)


@pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in pagemap need root")
def test_decode_pagemap_of_this_process_sees_touched_pages_only() -> None:
    """Real /proc/self/pagemap: 4 touched pages have frames, 4 untouched have none."""
    buf = mmap.mmap(-1, 8 * 4096)
    for i in range(4):
        buf[i * 4096] = 1
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    data = pagecount.pread_all(Path("/proc/self/pagemap"), addr // 4096 * 8, 8 * 8)
    frames = pagecount.decode_pagemap(data)
    assert all(f is not None for f in frames[:4]) and frames[4:] == [None] * 4
    assert len(set(frames[:4])) == 4


def test_a_frame_only_the_workload_maps_saves_its_mappings_minus_one() -> None:
    # 4 guests map frame 10 (KSM, mapcount 4): 3 pages saved, 0.75 each.
    frames = {f"g{i}": [10, 20 + i] for i in range(4)}
    flags = {10: KSM, **{20 + i: 0 for i in range(4)}}
    counts = pagecount.attribute(frames, flags, {10: 4})
    assert [c.saving_pages for c in counts] == [0.75] * 4
    assert [c.ksm_pages for c in counts] == [1] * 4
    assert pagecount.total_saving_mib(counts) * pagecount.PAGES_PER_MIB == 3


def test_a_frame_others_map_too_gives_the_workload_every_mapping() -> None:
    """A KSM frame with 2 workload mappings and 1 other: scrambling the workload's
    takes away 2 pages of saving, not 1."""
    counts = pagecount.attribute({"a": [7], "b": [7]}, {7: KSM}, {7: 3})
    assert sum(c.saving_pages for c in counts) == 2


def test_a_page_flagged_ksm_but_mapped_once_saves_nothing() -> None:
    """Debian's 6.12 flags every anonymous page KSM in kpageflags: mapcount 1 saves 0."""
    counts = pagecount.attribute({"a": [5, 6]}, {5: KSM, 6: KSM}, {5: 1, 6: 1})
    assert counts[0].saving_pages == 0 and counts[0].ksm_pages == 2


def test_zero_pages_save_one_each_and_absent_pages_nothing() -> None:
    counts = pagecount.attribute({"a": [1, 1, None]}, {1: ZERO}, {}, {"a": 3})
    c = counts[0]
    assert (c.pages, c.guest_present, c.host_present, c.zero_pages) == (3, 3, 2, 2)
    assert c.saving_pages == 2


def test_table_names_the_method() -> None:
    counts = pagecount.attribute({"a": [1]}, {1: 0}, {})
    df = pagecount.table("t1", counts)
    assert list(df["method"]) == ["pagemap"] and df.loc[0, "saving_mib"] == 0
