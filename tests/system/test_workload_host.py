"""dlfill on the host: real processes, real page contents read back from /proc/PID/mem."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.integrity import VERIFIED_PREFIX, Verification, parse_verified
from orchestrator.proc import run

pytestmark = pytest.mark.system

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKLOAD_DIR = REPO_ROOT / "images" / "workload"
PAGE_BYTES = 4096
PAGES_PER_MIB = (1 << 20) // PAGE_BYTES
DONE_PREFIX = "DLFILL DONE "
DONE_TIMEOUT_S = 30.0


@dataclass
class Held:
    """A dlfill started with --hold, with its parsed done line."""

    proc: subprocess.Popen[str]
    done: dict[str, object]

    @property
    def addr(self) -> int:
        return int(str(self.done["addr"]), 16)

    def region(self) -> bytes:
        pages = int(str(self.done["pages"]))
        with open(f"/proc/{self.proc.pid}/mem", "rb") as mem:
            mem.seek(self.addr)
            return mem.read(pages * PAGE_BYTES)


@pytest.fixture(scope="session")
def dlfill() -> Path:
    for tool in ("make", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: cannot build dlfill")
    run(["make", "-C", WORKLOAD_DIR], timeout_s=120)
    return WORKLOAD_DIR / "dlfill"


class Launcher:
    """Starts held dlfills and guarantees that none outlives the test."""

    def __init__(self, binary: Path):
        self.binary = binary
        self.started: list[Held] = []

    def start(self, *args: str) -> Held:
        proc = subprocess.Popen(
            [str(self.binary), *args, "--hold"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        held = Held(proc, {})
        self.started.append(held)
        held.done = read_done_line(proc)
        return held

    def close(self) -> None:
        for held in self.started:
            if held.proc.poll() is None:
                os.killpg(held.proc.pid, signal.SIGKILL)
            held.proc.wait(timeout=10)
            for stream in (held.proc.stdout, held.proc.stderr):
                if stream:
                    stream.close()


@pytest.fixture
def hold(dlfill: Path) -> Iterator[Launcher]:
    launcher = Launcher(dlfill)
    try:
        yield launcher
    finally:
        launcher.close()


def read_done_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    """Wait (bounded) for the done line of a held dlfill and parse its JSON."""
    assert proc.stdout is not None
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            assert line.startswith(DONE_PREFIX), f"unexpected output {line!r}"
            parsed: dict[str, object] = json.loads(line[len(DONE_PREFIX) :])
            return parsed
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"dlfill exited {proc.returncode} before its done line: {err}")
    pytest.fail(f"no done line from dlfill within {DONE_TIMEOUT_S} s")


def expected_counts(mib: int, dup: float, zero: float, unique: float, vol: float) -> dict[str, int]:
    pages = mib * PAGES_PER_MIB
    # half away from zero, like C's llround (Python's round() is half to even)
    z, u, v = (math.floor(f * pages + 0.5) for f in (zero, unique, vol))
    return {
        "pages": pages,
        "dup_pages": pages - z - u - v,
        "zero_pages": z,
        "unique_pages": u,
        "volatile_pages": v,
    }


def run_once(dlfill: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([dlfill, *args], check=False, timeout_s=60)


def region_vmas(pid: int, start: int, end: int) -> list[tuple[int, int, str]]:
    """(lo, hi, perms) of every VMA of pid that overlaps [start, end)."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
        assert m, line
        lo, hi = int(m[1], 16), int(m[2], 16)
        if lo < end and hi > start:
            out.append((lo, hi, m[3]))
    return out


def pages_of(blob: bytes) -> list[bytes]:
    return [blob[i : i + PAGE_BYTES] for i in range(0, len(blob), PAGE_BYTES)]


@pytest.mark.parametrize(
    ("mib", "fractions"),
    [
        (4, (1.0, 0.0, 0.0, 0.0)),
        (8, (0.5, 0.125, 0.25, 0.125)),
        (3, (0.0, 1 / 3, 1 / 3, 1 / 3)),
        # 85.5 + 85.5 + 85 pages: two round-ups overshoot, the volatile tail gives one back
        (1, (0.0, 85.5 / 256, 85.5 / 256, 85 / 256)),
        (5, (0.3, 0.3, 0.3, 0.1)),
    ],
)
def test_page_counts_follow_the_pattern(
    dlfill: Path, mib: int, fractions: tuple[float, float, float, float]
) -> None:
    dup, zero, unique, vol = fractions
    cp = run_once(
        dlfill,
        "--mib",
        str(mib),
        "--dup",
        repr(dup),
        "--zero",
        repr(zero),
        "--unique",
        repr(unique),
        "--volatile",
        repr(vol),
    )
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(DONE_PREFIX)
    done = json.loads(lines[0][len(DONE_PREFIX) :])
    want = expected_counts(mib, *fractions)
    if want["dup_pages"] < 0:  # rounding overshot: dlfill takes the page back from the tail
        want["volatile_pages"] += want["dup_pages"]
        want["dup_pages"] = 0
    assert {k: done[k] for k in want} == want
    assert done["mib"] == mib and done["vmas"] == 1
    assert sum(done[k] for k in want if k != "pages") == done["pages"]
    assert isinstance(done["fill_s"], float) and done["fill_s"] >= 0


@pytest.mark.parametrize("vmas", [2, 101, 256])
def test_fragment_makes_the_requested_vmas(hold: Launcher, vmas: int) -> None:
    held = hold.start("--mib", "1", "--dup", "1", "--fragment", str(vmas))
    start = held.addr
    end = start + int(str(held.done["pages"])) * PAGE_BYTES
    found = region_vmas(held.proc.pid, start, end)
    assert len(found) == vmas == held.done["vmas"]
    # exactly the region, no merge with neighbours, permissions alternating
    assert found[0][0] == start and found[-1][1] == end
    perms = [p for _, _, p in found]
    assert all(a != b for a, b in itertools.pairwise(perms)), perms
    held.proc.send_signal(signal.SIGTERM)
    assert held.proc.wait(timeout=10) == 0


def test_dup_pages_match_across_instances_and_unique_pages_do_not(hold: Launcher) -> None:
    pattern = [
        "--mib",
        "2",
        "--dup",
        "0.5",
        "--zero",
        "0.125",
        "--unique",
        "0.25",
        "--volatile",
        "0.125",
        "--seed",
        "42",
    ]
    a = hold.start(*pattern, "--instance", "1")
    b = hold.start(*pattern, "--instance", "2")
    other_seed = hold.start(*pattern[:-1], "43", "--instance", "1")
    pa, pb, pc = (pages_of(h.region()) for h in (a, b, other_seed))
    d, z, u = (int(str(a.done[k])) for k in ("dup_pages", "zero_pages", "unique_pages"))

    assert pa[:d] == pb[:d], "dup pages must be identical across instances with one seed"
    assert len(set(pa[:d])) == d, "dup pages must differ from each other within an instance"
    assert all(pa[i] != pc[i] for i in range(d)), "another seed must give other dup pages"
    assert all(p == bytes(PAGE_BYTES) for p in pa[d : d + z])
    assert all(pa[i] != pb[i] for i in range(d + z, len(pa))), "unique/volatile must differ"
    assert len(set(pa[d + z :] + pb[d + z :])) == 2 * (len(pa) - d - z)
    # the whole page carries data, not just a header
    assert all(p[2048:].count(0) < 64 for p in pa[:d] + pa[d + z : d + z + u])


def test_one_content_makes_every_dup_page_one_page(hold: Launcher) -> None:
    pattern = ["--mib", "1", "--dup", "0.5", "--unique", "0.5", "--one-content", "--seed", "5"]
    a = hold.start(*pattern, "--instance", "1")
    b = hold.start(*pattern, "--instance", "2")
    plain = hold.start(*pattern[:-3], "--seed", "5", "--instance", "1")
    assert a.done["one_content"] is True and plain.done["one_content"] is False
    pa, pb, pp = (pages_of(h.region()) for h in (a, b, plain))
    d = int(str(a.done["dup_pages"]))
    assert set(pa[:d]) == {pp[0]}, "every dup page must be dup page 0 of the seed"
    assert pa[:d] == pb[:d]
    assert len(set(pa[d:])) == len(pa) - d, "unique pages must stay unique"


def test_volatile_pages_change_while_held(hold: Launcher) -> None:
    held = hold.start("--mib", "1", "--dup", "0.5", "--volatile", "0.5", "--volatile-rate", "20000")
    d = int(str(held.done["dup_pages"]))
    first = pages_of(held.region())
    deadline = time.monotonic() + 10
    while True:
        now = pages_of(held.region())
        if all(x != y for x, y in zip(first[d:], now[d:], strict=True)):
            break
        assert time.monotonic() < deadline, "volatile pages were not all rewritten in 10 s"
        time.sleep(0.05)
    assert now[:d] == first[:d], "dup pages must stay put"
    held.proc.send_signal(signal.SIGINT)
    assert held.proc.wait(timeout=10) == 0


def test_mergeable_marks_the_region(hold: Launcher) -> None:
    if not Path("/sys/kernel/mm/ksm/run").exists():
        pytest.skip("kernel without KSM: MADV_MERGEABLE is refused")
    held = hold.start("--mib", "1", "--dup", "1", "--mergeable")
    smaps = Path(f"/proc/{held.proc.pid}/smaps").read_text()
    block = smaps.split(f"{held.addr:x}-", 1)[1].split("VmFlags:", 1)[1].splitlines()[0]
    assert "mg" in block.split()


def test_console_gets_the_done_line_too(dlfill: Path, tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.touch()
    cp = run_once(dlfill, "--mib", "1", "--dup", "1", "--console", str(console))
    assert cp.returncode == 0, cp.stderr
    assert console.read_text() == cp.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--mib"],
        ["--mib", "0", "--dup", "1"],
        ["--mib", "-4", "--dup", "1"],
        ["--mib", "x", "--dup", "1"],
        ["--mib", "1", "--dup", "0.5", "--zero", "0.4"],
        ["--mib", "1", "--dup", "1.5"],
        ["--mib", "1", "--dup", "1", "--fragment", "257"],
        [
            "--mib",
            "1",
            "--dup",
            "0.5",
            "--volatile",
            "0.5",
            "--volatile-rate",
            "10",
            "--fragment",
            "200",
        ],
        ["--mib", "1", "--dup", "1", "--no-such-option"],
        ["--mib", "1", "--dup", "1", "stray"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(dlfill: Path, args: list[str]) -> None:
    cp = run_once(dlfill, *args)
    assert cp.returncode == 2
    assert cp.stdout == ""
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlfill: "), cp.stderr


def test_runtime_failure_exits_1(dlfill: Path, tmp_path: Path) -> None:
    cp = run_once(dlfill, "--mib", "1", "--dup", "1", "--console", str(tmp_path / "no/such"))
    assert cp.returncode == 1
    assert cp.stderr.startswith("dlfill: ") and cp.stdout == ""


# ---------------------------------------------------------------- integrity (SIGUSR2)


def next_line(held: Held, prefix: str, timeout_s: float = DONE_TIMEOUT_S) -> str:
    """The next stdout line of a held dlfill, which must start with prefix."""
    assert held.proc.stdout is not None
    ready, _, _ = select.select([held.proc.stdout], [], [], timeout_s)
    assert ready, f"no {prefix!r} line within {timeout_s} s"
    line = held.proc.stdout.readline()
    assert line.startswith(prefix), f"unexpected output {line!r}"
    return line


def verify(held: Held) -> Verification:
    held.proc.send_signal(signal.SIGUSR2)
    return parse_verified(next_line(held, VERIFIED_PREFIX).rstrip("\n"), "t")


def poke(held: Held, page: int, offset: int = 100) -> None:
    """Change one byte of a page behind dlfill's back, as a wrong merge, migration or
    swap-in would: root writes through /proc/PID/mem (which breaks a KSM page's sharing
    and writes into read-only fragments too, like ptrace)."""
    with open(f"/proc/{held.proc.pid}/mem", "r+b") as mem:
        mem.seek(held.addr + page * PAGE_BYTES + offset)
        old = mem.read(1)
        mem.seek(held.addr + page * PAGE_BYTES + offset)
        mem.write(bytes([old[0] ^ 0x5A]))


MIXED = ["--mib", "4", "--dup", "0.5", "--zero", "0.25", "--unique", "0.125", "--volatile", "0.125"]


@pytest.mark.parametrize("one_content", [False, True])
def test_verify_finds_pages_changed_behind_its_back(hold: Launcher, one_content: bool) -> None:
    held = hold.start(*MIXED, "--fragment", "101", "--mergeable", "--seed", "9",
                      *(["--one-content"] if one_content else []))  # fmt: skip
    clean = verify(held)
    assert (clean.pages, clean.mismatches, clean.first, clean.seq) == (1024, 0, (), 1)
    d, z, u = (int(str(held.done[k])) for k in ("dup_pages", "zero_pages", "unique_pages"))
    # one page of each kind: a read-only fragment of dup, zero, unique, volatile (rate 0)
    pages = [3, d + 7, d + z + 1, d + z + u + 5]
    for p in pages:
        poke(held, p)
    found = verify(held)
    assert (found.mismatches, found.first, found.seq) == (4, tuple(pages), 2)
    for p in pages:  # put the bytes back: the same pages verify clean again
        poke(held, p)
    assert verify(held).mismatches == 0


def test_verify_names_the_first_16_of_many_mismatches(hold: Launcher) -> None:
    held = hold.start("--mib", "1", "--dup", "1")
    pages = list(range(10, 250, 8))  # 30 pages
    for p in pages:
        poke(held, p, offset=PAGE_BYTES - 1)  # the last byte, past the header
    found = verify(held)
    assert found.mismatches == 30 and found.first == tuple(pages[:16])


def test_verify_is_clean_while_volatile_pages_are_rewritten(hold: Launcher) -> None:
    held = hold.start(*MIXED, "--volatile-rate", "50000")
    first = pages_of(held.region())
    results = []
    for _ in range(5):
        results.append(verify(held))
        time.sleep(0.05)
    assert [r.mismatches for r in results] == [0] * 5
    assert [r.seq for r in results] == [1, 2, 3, 4, 5]
    v0 = int(str(held.done["pages"])) - int(str(held.done["volatile_pages"]))
    assert pages_of(held.region())[v0:] != first[v0:], "volatile pages were not rewritten"
    poke(held, 0)  # a dup page: the rewriter leaves it alone, verification still sees it
    assert verify(held).first == (0,)


def test_verify_after_a_scramble_expects_scrambled_pages(hold: Launcher) -> None:
    held = hold.start(*MIXED, "--volatile-rate", "20000", "--fragment", "41")
    held.proc.send_signal(signal.SIGUSR1)
    next_line(held, "DLFILL SCRAMBLED ")
    assert verify(held).mismatches == 0
    poke(held, 2)
    assert verify(held).first == (2,)


def test_verified_line_goes_to_the_console_too(hold: Launcher, tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.touch()
    held = hold.start("--mib", "1", "--dup", "1", "--console", str(console))
    v = verify(held)
    lines = console.read_text().splitlines()
    assert lines[-1].startswith(VERIFIED_PREFIX)
    assert parse_verified(lines[-1], "t") == v


def test_host_workload_check_fails_the_trial_with_the_page_indices(
    dlfill: Path, tmp_path: Path
) -> None:
    """The runner's path for host copies: HostProcess, SIGUSR2, the .out file, the log."""
    from orchestrator import images, integrity, proc
    from orchestrator.errors import IntegrityError
    from orchestrator.triggers import HostProcess, wait_done

    procs = []
    try:
        for i in range(2):
            out = tmp_path / f"host-dlfill-{i}.out"
            with open(out, "wb") as f:
                p = proc.spawn_group(
                    images.fragmented_copy_argv(str(dlfill), 2, 51, 7, i, one_content=True),
                    stdout=f.fileno(),
                )
            procs.append(HostProcess(p.pid, p, wait_done(out, p, 30), out))
        log = integrity.IntegrityLog()
        log.add_source(lambda: integrity.verify_host_workload(procs, timeout_s=30))
        assert [v.mismatches for v in log.check("merge")] == [0, 0]
        addr = int(procs[1].done["addr"], 16)
        with open(f"/proc/{procs[1].pid}/mem", "r+b") as mem:
            for page in (4, 300):  # a read-only fragment, then the writable rest
                mem.seek(addr + page * PAGE_BYTES + 4000)
                old = mem.read(1)[0]
                mem.seek(addr + page * PAGE_BYTES + 4000)
                mem.write(bytes([old ^ 0xFF]))
        with pytest.raises(IntegrityError, match=r"host-dlfill-1: 2 of 512 pages corrupted"):
            log.check("reclaim", 1)
        df = log.table("t0", 0)
        bad = df[df.mismatches > 0]
        assert bad[["phase", "step", "workload", "first_mismatch_pages"]].values.tolist() == [
            ["reclaim", 1, "host-dlfill-1", "4,300"]
        ]
        assert df.groupby("phase").pages_checked.sum().to_dict() == {"merge": 1024, "reclaim": 1024}
    finally:
        for hp in procs:
            proc.stop_group(hp.popen)
