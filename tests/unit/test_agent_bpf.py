"""The agent's BPF fentry/fexit collector, piece by piece: BTF lookup (the real kernel's
BTF and a hand-made blob), the programs' shape, the ring buffer (a real map where the
host allows one) and the records it turns into JSON lines. Loading the programs needs a
kernel without lockdown: tests/system/test_labhost.py runs them in a lab host."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from orchestrator.agent import bpf, fs, trace


def btf_blob(types: list[bytes], strings: bytes) -> bytes:
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, sum(map(len, types)),
                         sum(map(len, types)), len(strings))  # fmt: skip
    return header + b"".join(types) + strings


def btf_type(name_off: int, kind: int, vlen: int, size_or_type: int, extra: bytes = b"") -> bytes:
    return struct.pack("<III", name_off, (kind << 24) | vlen, size_or_type) + extra


def test_btf_lookup_skips_every_kind_by_its_own_size() -> None:
    strings = b"\0int\0pair\0a\0b\0walk\0"
    names = ("int", "pair", "a", "b", "walk")
    off = {n: strings.index(b"\0" + n.encode() + b"\0") + 1 for n in names}
    types = [
        btf_type(off["int"], 1, 0, 4, struct.pack("<I", 32)),  # id 1: INT (+4)
        btf_type(off["pair"], 4, 2, 8, struct.pack("<III", off["a"], 1, 0) * 2),  # 2: STRUCT
        btf_type(0, 13, 1, 1, struct.pack("<II", 0, 1)),  # id 3: FUNC_PROTO (+8 per param)
        btf_type(off["walk"], 7, 0, 0),  # id 4: a FWD named walk: not a FUNC
        btf_type(off["walk"], 12, 0, 3),  # id 5: FUNC walk
    ]
    blob = btf_blob(types, strings)
    assert bpf.btf_func_id("walk", blob) == 5
    assert bpf.btf_member_offset("pair", "a", blob) == 0  # both members are named "a"
    assert bpf.btf_member_offset("pair", "b", blob) is None
    assert bpf.btf_member_offset("walk", "a", blob) is None  # not a struct
    assert bpf.btf_func_id("pair", blob) is None  # a struct, not a function
    assert bpf.btf_func_id("absent", blob) is None
    with pytest.raises(fs.AgentError, match="bad magic"):
        bpf.btf_func_id("walk", b"\0" * 24)


@pytest.mark.skipif(not bpf.VMLINUX_BTF.exists(), reason="kernel without BTF")
def test_this_kernels_btf_has_rmap_walk_ksm() -> None:
    found = bpf.kernel_func_id("rmap_walk_ksm")
    blob = bpf.VMLINUX_BTF.read_bytes()
    assert bpf.btf_func_id("rmap_walk_ksm", blob) == found > 0
    with pytest.raises(fs.AgentError, match="no function densitylab_no_such"):
        bpf.kernel_func_id("densitylab_no_such_function")
    # bool (*rmap_one)(...) after void *arg and two bools (include/linux/rmap.h).
    assert bpf.walk_func_offset() == 16


def test_member_offsets_of_a_bitfield_struct() -> None:
    strings = b"\0s\0x\0y\0"
    off = {n: strings.index(b"\0" + n.encode() + b"\0") + 1 for n in ("s", "x", "y")}
    members = struct.pack("<III", off["x"], 1, (3 << 24) | 0)
    members += struct.pack("<III", off["y"], 1, (5 << 24) | 64)  # bit 64, 5 bits wide
    kind_flag_struct = struct.pack("<III", off["s"], (1 << 31) | (4 << 24) | 2, 16)
    blob = btf_blob([kind_flag_struct + members], strings)
    assert bpf.btf_member_offset("s", "y", blob) == 8


def decode(code: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per 8-byte instruction slot."""
    out = []
    for i in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack_from("<BBhi", code, i)
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


def test_the_programs_end_in_exit_and_the_fexit_branch_lands_on_it() -> None:
    for code in (bpf.fentry_program(7), bpf.fexit_program(7, 8, 16)):
        insns = decode(code)
        assert len(code) % 8 == 0 and insns[-1][0] == 0x95  # exit
        assert insns[-2][:2] == (0xB7, 0) and insns[-2][4] == 0  # r0 = 0
    insns = decode(bpf.fexit_program(7, 8, 16))
    (branch,) = [i for i, x in enumerate(insns) if x[0] == 0x15]
    assert branch + 1 + insns[branch][3] == len(insns) - 2  # to `r0 = 0; exit`
    maps = [x[4] for x in insns if x[0] == 0x18 and x[2] == bpf.BPF_PSEUDO_MAP_FD]
    assert maps == [7, 7, 8]  # lookup and delete in starts, output to the ring
    calls = [x[4] for x in insns if x[0] == 0x85]
    assert calls[-1] == bpf.RINGBUF_OUTPUT and bpf.GET_CURRENT_COMM in calls
    # The context is kept in r8 before any call; rwc = ctx[1], then rwc->rmap_one.
    assert insns[0] == (0xBF, bpf.R8, bpf.R1, 0, 0)
    loads = [x for x in insns if x[0] == 0x79]
    assert (0x79, bpf.R1, bpf.R8, 8, 0) in loads and (0x79, bpf.R1, bpf.R1, 16, 0) in loads


def slot(
    ts: int, dur: int, tid: int, tgid: int, comm: bytes, hdr_flags: int = 0, func: int = 0
) -> bytes:
    hdr = struct.pack("<II", bpf.RECORD.size | hdr_flags, 0)
    return hdr + bpf.RECORD.pack(ts, dur, (tgid << 32) | tid, func, comm)


def test_records_split_pid_tgid_and_skip_discarded_slots(tmp_path: Path) -> None:
    raw = slot(100, 5, 41, 40, b"migratepages", func=0xFFFF0010)
    raw += slot(1, 1, 1, 1, b"x", bpf.RINGBUF_DISCARD_BIT)
    raw += slot(200, 7, 42, 42, b"kcompactd0", func=0xFFFF0020)
    assert list(bpf.records(raw)) == [
        (100, 5, 41, 40, 0xFFFF0010, "migratepages"),
        (200, 7, 42, 42, 0xFFFF0020, "kcompactd0"),
    ]
    path = tmp_path / "lat.jsonl.raw"
    path.write_bytes(raw)
    out = tmp_path / "lat.jsonl"
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffff0000 T _text\nffff0010 t try_to_migrate_one\n")
    assert trace.write_fentry_samples(path, out, kallsyms) == 2
    first, second = (json.loads(ln) for ln in out.read_text().splitlines())
    # The same fields as the kprobe collector's samples, pid being the thread.
    assert first == {"ts_ns": 100, "duration_ns": 5, "method": "bpf-fentry",
                     "lower_bound": False, "pid": 41, "comm": "migratepages",
                     "rmap_one": "try_to_migrate_one"}  # fmt: skip
    assert second["rmap_one"] == "0xffff0020"  # not in kallsyms: the address itself


def test_a_real_ring_buffer_maps_and_reads_empty() -> None:
    try:
        fd = bpf.map_create(bpf.BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16)
    except fs.AgentError as e:
        pytest.skip(f"this host refuses BPF maps: {e}")
    try:
        reader = bpf.RingReader(fd, 1 << 16)
        assert reader.take() == b""
        reader.close()
    finally:
        os.close(fd)


def test_a_refused_bpf_call_names_the_errno() -> None:
    with pytest.raises(fs.AgentError, match="EINVAL"):
        bpf.map_create(bpf.BPF_MAP_TYPE_RINGBUF, 0, 0, 12345)  # not a power of 2


def test_a_walk_tracepoint_gives_its_duration_field(tmp_path: Path) -> None:
    """The series' rmap/rmap_walk tracepoint is in no kernel here: its format is read
    from the event's own format file, so any duration field name works."""
    ev = tmp_path / "rmap_walk"
    ev.mkdir()
    (ev / "format").write_text(
        "name: rmap_walk\nformat:\n\tfield:unsigned short common_type;\toffset:0;\n"
        "\tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:u64 duration_ns;\toffset:16;\tsize:8;\tsigned:0;\n"
    )
    field = trace.duration_field(ev)
    assert field == "duration_ns"
    line = "  migratepages-41 [001] ..... 100.000500: rmap_walk: pfn=0x1234 duration_ns=500"
    parsed = trace.parse_trace_line(line)
    assert parsed is not None
    got = trace.WalkEventReader(field).feed(parsed)
    assert got is not None and got["duration_ns"] == 500
    assert got["ts_ns"] == 100_000_500_000 - 500 and got["pid"] == 41
