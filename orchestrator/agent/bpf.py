"""BPF fentry/fexit timing of one kernel function, stdlib only (ctypes and mmap).

Why not bpftrace: it drags LLVM into the lab image, takes tens of seconds to start under
TCG, and prints one text line per walk that a Python loop on the same vCPUs must parse
(what made the kprobe collector cost 11-20% of migration throughput). Here two tiny
hand-assembled programs do the work in the kernel: fentry stores the entry time per
thread, fexit writes one fixed-size binary record (start ns, duration ns, pid/tid,
the walk's rmap_walk_control.rmap_one, comm) into a BPF ring buffer without waking
anyone. The agent copies the ring buffer's
new bytes to a file a few times a second (one memcpy, no per-walk work) and turns the
file into JSON lines only once collection has stopped. Every walk keeps its own time
stamp and pid, so attribution by time window and pid works as with kprobes.

rmap_one says which walk it was (try_to_migrate_one, remove_migration_pte,
folio_referenced_one, try_to_unmap_one, ...): the walks that stop once the page is
unmapped cost about half of those that visit every mapping on the old kernel, so one
page moved gives two walks of different cost and a row must not pool them.

Timestamps are bpf_ktime_get_ns(), CLOCK_MONOTONIC: they line up with the samplers'.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

from .fs import AgentError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
SYS_BPF_X86_64 = 321

# bpf(2) commands, map, program and attach types (include/uapi/linux/bpf.h).
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_RINGBUF = 1, 27
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY, BPF_TRACE_FEXIT = 24, 25
BPF_PSEUDO_MAP_FD = 1
BPF_RB_NO_WAKEUP = 1
RINGBUF_BUSY_BIT, RINGBUF_DISCARD_BIT = 1 << 31, 1 << 30
RINGBUF_HDR_SZ = 8
# Helpers by number.
MAP_LOOKUP, MAP_UPDATE, MAP_DELETE = 1, 2, 3
KTIME_GET_NS, GET_CURRENT_PID_TGID, GET_CURRENT_COMM, RINGBUF_OUTPUT = 5, 14, 16, 130

# One walk: start ns, duration ns, pid_tgid (tgid << 32 | tid), rmap_one address, comm[16].
RECORD = struct.Struct("<QQQQ16s")
RECORD_SLOT = RINGBUF_HDR_SZ + RECORD.size  # 56: a multiple of 8, no padding
BTF_KIND_STRUCT, BTF_KIND_FUNC = 4, 12
WALK_CONTROL, WALK_FUNC_MEMBER = "rmap_walk_control", "rmap_one"
WALK_CONTROL_ARG = 1  # rmap_walk_ksm(struct folio *, struct rmap_walk_control *)


# ---------------------------------------------------------------- BTF


def btf_type_extra(kind: int, vlen: int) -> int:
    """Bytes that follow a btf_type of this kind (include/uapi/linux/btf.h)."""
    if kind in (1, 14, 17):  # INT, VAR, DECL_TAG
        return 4
    if kind == 3:  # ARRAY
        return 12
    if kind in (4, 5, 15, 19):  # STRUCT, UNION, DATASEC, ENUM64
        return 12 * vlen
    if kind in (6, 13):  # ENUM, FUNC_PROTO
        return 8 * vlen
    return 0


def _btf_sections(btf: bytes) -> tuple[int, int, bytes]:
    """(first type's offset, end of the types, string section) of a raw BTF blob."""
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", btf, 0
    )
    if magic != 0xEB9F:
        raise AgentError(f"BTF: bad magic {magic:#x}")
    strings = btf[hdr_len + str_off : hdr_len + str_off + str_len]
    return hdr_len + type_off, hdr_len + type_off + type_len, strings


def _name_offsets(name: str, strings: bytes) -> set[int]:
    """Where `name` stands in the string section: types are then matched by number."""
    return {m.start() + 1 for m in re.finditer(b"\0" + name.encode() + b"\0", strings)}


def _btf_types(btf: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type id, name offset, kind, vlen, offset of the type's header) of every type."""
    pos, end, _strings = _btf_sections(btf)
    unpack = struct.Struct("<III").unpack_from
    type_id = 1
    while pos < end:
        name_off, info, _ = unpack(btf, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        yield type_id, name_off, kind, vlen, pos
        pos += 12 + btf_type_extra(kind, vlen)
        type_id += 1


def btf_func_id(name: str, btf: bytes) -> int | None:
    """The type id of the BTF FUNC named `name` in a raw BTF blob, None if absent."""
    offsets = _name_offsets(name, _btf_sections(btf)[2])
    if offsets:
        for type_id, name_off, kind, _vlen, _pos in _btf_types(btf):
            if kind == BTF_KIND_FUNC and name_off in offsets:
                return type_id
    return None


def btf_member_offset(struct_name: str, member: str, btf: bytes) -> int | None:
    """Byte offset of `member` in the BTF STRUCT `struct_name`, None if either is absent."""
    strings = _btf_sections(btf)[2]
    structs, members = _name_offsets(struct_name, strings), _name_offsets(member, strings)
    if not structs or not members:
        return None
    for _id, name_off, kind, vlen, pos in _btf_types(btf):
        if kind != BTF_KIND_STRUCT or name_off not in structs:
            continue
        kind_flag = struct.unpack_from("<I", btf, pos + 4)[0] >> 31
        for i in range(vlen):
            m_name, _type, bits = struct.unpack_from("<III", btf, pos + 12 + 12 * i)
            if m_name in members:
                # With kind_flag the low 24 bits are the bit offset (bitfield size above).
                return int((bits & 0xFFFFFF) if kind_flag else bits) // 8
    return None


def read_btf(btf_path: Path = VMLINUX_BTF) -> bytes:
    try:
        return btf_path.read_bytes()
    except OSError as e:
        raise AgentError(f"{btf_path}: {e.strerror or e} (kernel without BTF?)") from e


def kernel_func_id(name: str, btf_path: Path = VMLINUX_BTF, blob: bytes | None = None) -> int:
    """BTF id of a kernel function; AgentError naming the file when it has none."""
    found = btf_func_id(name, read_btf(btf_path) if blob is None else blob)
    if found is None:
        raise AgentError(f"{btf_path}: no function {name}")
    return found


def walk_func_offset(btf_path: Path = VMLINUX_BTF, blob: bytes | None = None) -> int:
    """Offset of rmap_one in the kernel's struct rmap_walk_control (16 on 6.12 and 7.3)."""
    found = btf_member_offset(WALK_CONTROL, WALK_FUNC_MEMBER, blob or read_btf(btf_path))
    if found is None:
        raise AgentError(f"{btf_path}: no {WALK_CONTROL}.{WALK_FUNC_MEMBER}")
    return found


# ---------------------------------------------------------------- bpf(2)

_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: bytearray, what: str) -> int:
    """One bpf(2) call on a zero-padded attr; returns its fd. Raises AgentError with the
    errno name (EPERM: locked down or unprivileged)."""
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    rc = _libc.syscall(SYS_BPF_X86_64, cmd, buf, len(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise AgentError(f"bpf({what}): {errno.errorcode.get(err, err)} {os.strerror(err)}")
    return int(rc)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    attr = bytearray(128)
    struct.pack_into("<IIII", attr, 0, map_type, key_size, value_size, max_entries)
    return bpf(BPF_MAP_CREATE, attr, f"map create type {map_type}")


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """The two-slot ld_imm64 that the verifier turns into a map pointer."""
    return insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, fd) + insn(0)


def call(helper: int) -> bytes:
    return insn(0x85, imm=helper)


def mov_k(dst: int, imm: int) -> bytes:
    return insn(0xB7, dst, imm=imm)


def mov_x(dst: int, src: int) -> bytes:
    return insn(0xBF, dst, src)


def add_k(dst: int, imm: int) -> bytes:
    return insn(0x07, dst, imm=imm)


def stx_dw(dst: int, off: int, src: int) -> bytes:
    return insn(0x7B, dst, src, off)


def ldx_dw(dst: int, src: int, off: int) -> bytes:
    return insn(0x79, dst, src, off)


EXIT = mov_k(0, 0) + insn(0x95)
R0, R1, R2, R3, R4, R6, R7, R8, R10 = 0, 1, 2, 3, 4, 6, 7, 8, 10


def fentry_program(starts_fd: int) -> bytes:
    """starts[pid_tgid] = now."""
    return b"".join([
        call(GET_CURRENT_PID_TGID), stx_dw(R10, -8, R0),
        call(KTIME_GET_NS), stx_dw(R10, -16, R0),
        ld_map_fd(R1, starts_fd), mov_x(R2, R10), add_k(R2, -8), mov_x(R3, R10), add_k(R3, -16),
        mov_k(R4, 0), call(MAP_UPDATE),
        EXIT,
    ])  # fmt: skip


def fexit_program(starts_fd: int, ring_fd: int, walk_func_off: int) -> bytes:
    """With a start for this thread: one record into the ring buffer, start deleted.
    The record is built on the stack at fp-64 (start, duration, pid_tgid, rmap_one,
    comm). rmap_one is read through the function's second argument, a BTF pointer: the
    verifier checks the offset against struct rmap_walk_control and guards the load."""
    found = b"".join([
        ldx_dw(R1, R0, 0), stx_dw(R10, -64, R1), insn(0x1F, R6, R1),  # r6 = now - start
        stx_dw(R10, -56, R6), stx_dw(R10, -48, R7),
        ldx_dw(R1, R8, 8 * WALK_CONTROL_ARG), ldx_dw(R1, R1, walk_func_off),
        stx_dw(R10, -40, R1),
        mov_x(R1, R10), add_k(R1, -32), mov_k(R2, 16), call(GET_CURRENT_COMM),
        ld_map_fd(R1, starts_fd), mov_x(R2, R10), add_k(R2, -8), call(MAP_DELETE),
        ld_map_fd(R1, ring_fd), mov_x(R2, R10), add_k(R2, -64), mov_k(R3, RECORD.size),
        mov_k(R4, BPF_RB_NO_WAKEUP), call(RINGBUF_OUTPUT),
    ])  # fmt: skip
    return b"".join([
        mov_x(R8, R1),  # the context (the arguments), kept past the helper calls
        call(KTIME_GET_NS), mov_x(R6, R0),
        call(GET_CURRENT_PID_TGID), mov_x(R7, R0), stx_dw(R10, -8, R0),
        ld_map_fd(R1, starts_fd), mov_x(R2, R10), add_k(R2, -8), call(MAP_LOOKUP),
        insn(0x15, R0, off=len(found) // 8),  # no start for this thread: straight to exit
        found,
        EXIT,
    ])  # fmt: skip


def prog_load(code: bytes, attach_type: int, btf_id: int, name: str) -> int:
    """Load a tracing program attached (later) to the kernel function btf_id. On a
    verifier refusal the message carries the tail of the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = bytearray(144)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_TRACING, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_),
                     1, len(log), ctypes.addressof(log))  # fmt: skip
    struct.pack_into("16s", attr, 48, name.encode()[:15])
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    try:
        return bpf(BPF_PROG_LOAD, attr, f"load {name}")
    except AgentError as e:
        tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise AgentError(f"{e}{': ' + ' / '.join(tail) if tail else ''}") from e


def attach(prog_fd: int, name: str) -> int:
    attr = bytearray(64)
    struct.pack_into("<QI", attr, 0, 0, prog_fd)
    return bpf(BPF_RAW_TRACEPOINT_OPEN, attr, f"attach {name}")


# ---------------------------------------------------------------- the ring buffer


class RingReader:
    """Consumer side of a BPF_MAP_TYPE_RINGBUF map through mmap(2).

    Page 0 (read-write) holds consumer_pos; from page 1 (read-only) come producer_pos
    and the data pages, mapped twice in a row by the kernel so a record never wraps."""

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.size, self.mask = size, size - 1
        self.cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.prod = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.data_off = page

    def close(self) -> None:
        self.prod.close()
        self.cons.close()

    def take(self) -> bytes:
        """Every committed record slot since the last call, as raw bytes (headers too).

        Records are all RECORD_SLOT bytes; the first one still being written (busy
        bit) ends the batch, the rest waits for the next call."""
        (cons,) = struct.unpack_from("<Q", self.cons, 0)
        (prod,) = struct.unpack_from("<Q", self.prod, 0)
        if prod == cons:
            return b""
        start = self.data_off + (cons & self.mask)
        chunk = self.prod[start : start + (prod - cons)]
        # Byte 3 of each header holds the busy and discard bits; one C-speed scan.
        flags = chunk[3::RECORD_SLOT]
        busy = re.search(rb"[\x80-\xff]", flags)
        n = busy.start() if busy else len(flags)
        chunk = chunk[: n * RECORD_SLOT]
        struct.pack_into("<Q", self.cons, 0, cons + len(chunk))
        return chunk


def records(raw: bytes) -> Iterator[tuple[int, int, int, int, int, str]]:
    """(ts_ns, duration_ns, tid, tgid, rmap_one address, comm) of each slot of raw ring
    buffer bytes; discarded slots are skipped."""
    for off in range(0, len(raw) - RECORD_SLOT + 1, RECORD_SLOT):
        (hdr,) = struct.unpack_from("<I", raw, off)
        if hdr & RINGBUF_DISCARD_BIT:
            continue
        ts, dur, pid_tgid, walk_func, comm = RECORD.unpack_from(raw, off + RINGBUF_HDR_SZ)
        name = comm.split(b"\0", 1)[0].decode(errors="replace")
        yield ts, dur, pid_tgid & 0xFFFFFFFF, pid_tgid >> 32, walk_func, name


class FentryTimer:
    """fentry + fexit programs on one kernel function, their maps and links; closed
    (detached) on exit whatever happens. Raises AgentError when the kernel refuses
    (no BTF, locked down, unprivileged, no such function)."""

    def __init__(self, func: str = "rmap_walk_ksm", ring_bytes: int = 16 << 20) -> None:
        self.func = func
        self.ring_bytes = ring_bytes
        self.fds: list[int] = []
        self.reader: RingReader | None = None

    def __enter__(self) -> FentryTimer:
        try:
            blob = read_btf()
            btf_id = kernel_func_id(self.func, blob=blob)
            walk_func_off = walk_func_offset(blob=blob)
            starts = self.own(map_create(BPF_MAP_TYPE_HASH, 8, 8, 4096))
            ring = self.own(map_create(BPF_MAP_TYPE_RINGBUF, 0, 0, self.ring_bytes))
            progs = [
                (fentry_program(starts), BPF_TRACE_FENTRY, "dl_rwk_entry"),
                (fexit_program(starts, ring, walk_func_off), BPF_TRACE_FEXIT, "dl_rwk_exit"),
            ]
            for code, kind, name in progs:
                prog = self.own(prog_load(code, kind, btf_id, name))
                self.own(attach(prog, f"{name} to {self.func}"))
            self.reader = RingReader(ring, self.ring_bytes)
        except BaseException:
            self.close()
            raise
        return self

    def own(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def take(self) -> bytes:
        assert self.reader is not None
        return self.reader.take()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        # Links first (LIFO): closing a link's fd detaches its program.
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


def fentry_allowed(func: str = "rmap_walk_ksm") -> tuple[bool, str]:
    """Attach the real programs to func and detach at once: the probe is the collector."""
    try:
        with FentryTimer(func, ring_bytes=1 << 16):
            pass
    except AgentError as e:
        return False, str(e)
    return True, f"BPF fentry/fexit attached to {func} (BTF id from {VMLINUX_BTF})"
