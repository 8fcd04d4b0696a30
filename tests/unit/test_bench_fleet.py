"""bench/fleet_start.py: its QEMU command line, agent ping, process group and summary.

No guests here: the agent is a unix socket served by a thread, QEMU is `sleep`/`true`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import fleet_start as fs
from orchestrator import fleet
from orchestrator.errors import GuestError


def bench(tmp_path: Path, accel: str = "tcg") -> fs.Bench:
    return fs.Bench(
        image=fleet.GuestImage(Path("/k/vmlinuz"), Path("/k/initrd.img")),
        guests=4,
        memory_mib=256,
        vcpus=1,
        accel=accel,
        timeout_s=5,
        poll_s=0.01,
        workdir=tmp_path,
        run_id="bench-test",
    )


def after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_qemu_argv_has_the_settings_libvirt_uses(tmp_path: Path) -> None:
    argv = fs.qemu_argv(bench(tmp_path), "dl-bench-test-b1-g0")
    assert argv[0] == fleet.EMULATOR
    assert after(argv, "-accel") == ["tcg"]
    assert after(argv, "-cpu") == ["qemu64"]
    assert after(argv, "-m") == ["256"]
    assert after(argv, "-smp")[0].startswith("1,")
    assert after(argv, "-kernel") == ["/k/vmlinuz"]
    assert after(argv, "-initrd") == ["/k/initrd.img"]
    assert after(argv, "-append") == [fleet.GUEST_CMDLINE]
    assert {"-nodefaults", "-no-reboot", "-no-user-config"} <= set(argv)
    chardevs = after(argv, "-chardev")
    assert f"file,id=charserial0,path={tmp_path}/dl-bench-test-b1-g0.log,append=on" in chardevs
    sock = f"socket,id=charchannel0,path={tmp_path}/dl-bench-test-b1-g0.qga,server=on,wait=off"
    assert sock in chardevs
    assert any("name=org.qemu.guest_agent.0" in d for d in after(argv, "-device"))


def test_kvm_uses_the_host_cpu(tmp_path: Path) -> None:
    argv = fs.qemu_argv(bench(tmp_path, accel="kvm"), "g")
    assert (after(argv, "-accel"), after(argv, "-cpu")) == (["kvm"], ["host"])
    assert bench(tmp_path, accel="kvm").domain_type == "kvm"
    assert bench(tmp_path).domain_type == "qemu"


def test_only_the_matching_sync_reply_counts() -> None:
    assert fs.is_reply_to(b'{"return": 42}\n', 42)
    assert not fs.is_reply_to(b'{"return": 41}\n', 42)  # stale: an earlier client's sync
    assert not fs.is_reply_to(b'{"return": {}}\n', 42)  # stale: an earlier ping
    assert not fs.is_reply_to(b"\xff{garbled\n", 42)
    assert not fs.is_reply_to(b"", 42)


Agent = Callable[[socket.socket], None]


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[Callable[[Agent], Path]]:
    """Serve one connection on a unix socket with the given behaviour."""
    threads: list[threading.Thread] = []
    path = tmp_path / "qga.sock"

    def serve(behaviour: Agent) -> Path:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)

        def run() -> None:
            with srv, srv.accept()[0] as conn:
                behaviour(conn)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield serve
    for t in threads:
        t.join(timeout=5)


def read_request(conn: socket.socket) -> dict:
    buf = b""
    while True:  # our client sends one JSON object per write, no newline
        buf += conn.recv(4096)
        try:
            return json.loads(buf)
        except ValueError:
            continue


def test_ping_skips_stale_replies(fake_agent) -> None:
    def agent(conn: socket.socket) -> None:
        sync = read_request(conn)
        assert sync["execute"] == "guest-sync"
        # Left over from earlier clients; taking either for the sync makes the ping fail.
        conn.sendall(b'{"return": {}}\n{"error": {"class": "GenericError"}}\n{"return": 1}\n')
        conn.sendall(json.dumps({"return": sync["arguments"]["id"]}).encode() + b"\n")
        assert read_request(conn) == {"execute": "guest-ping"}
        conn.sendall(b'{"return": {}}\n')

    assert fs.agent_ping(fake_agent(agent), timeout_s=5)


def test_ping_fails_on_an_error_reply_or_silence(fake_agent, tmp_path: Path) -> None:
    assert not fs.agent_ping(tmp_path / "nobody-listens.sock")

    def silent(conn: socket.socket) -> None:
        read_request(conn)
        time.sleep(0.5)

    t0 = time.monotonic()
    assert not fs.agent_ping(fake_agent(silent), timeout_s=0.2)
    assert time.monotonic() - t0 < 0.45


def test_plain_fleet_is_one_group_and_stops_whole(tmp_path: Path) -> None:
    plain = fs.PlainFleet()
    try:
        for i in range(3):
            plain.launch(["sleep", "30"], tmp_path / f"{i}.out")
        assert plain.pgid == plain.procs[0].pid
        assert {os.getpgid(p.pid) for p in plain.procs} == {plain.pgid}
        assert plain.pgid != os.getpgid(0)
    finally:
        t0 = time.monotonic()
        assert plain.stop() == []
    assert time.monotonic() - t0 < 3
    assert all(p.returncode is not None for p in plain.procs)


def test_stop_without_launch_touches_nothing() -> None:
    assert fs.PlainFleet().stop() == []


def test_an_exited_qemu_fails_with_its_console(tmp_path: Path) -> None:
    log = tmp_path / "g.log"
    log.write_text("DENSITYLAB: boot ok\nKernel panic - not syncing\n")
    proc = subprocess.Popen(["true"])
    proc.wait()
    guest = fs.PlainGuest("g", proc, log, tmp_path / "none.qga")
    with pytest.raises(GuestError, match=r"qemu exited 0.*Kernel panic"):
        fs.wait_plain([guest], time.monotonic_ns(), timeout_s=1, poll_s=0.01)
    assert guest.boot_s is not None


def sample(side: str, r: int, ready_s: float, **marks: float) -> fs.Sample:
    return fs.Sample(side, r, ready_s, marks=marks, teardown_s=1.0)


def test_ratios_pair_rounds_and_the_summary_survives_a_missing_b() -> None:
    a = [sample("A", 1, 6.0, define=0.01), sample("A", 2, 9.0), sample("A", 3, 7.0)]
    b = [sample("B", 1, 5.0), sample("B", 2, 10.0)]  # interrupted before B of round 3
    assert fs.ratios(a, b) == [1.2, 0.9]
    assert fs.Spread.of([1.2, 0.9]) == fs.Spread(1.05, 0.9, 1.2)
    a[0].guest_cpu_s = 6.0  # 6 CPU-s over 6 s on 2 CPUs: half the host
    text = "\n".join(fs.summary_lines(a, b, nproc=2))
    assert "A/B per pair            1.050    0.900    1.200  2" in text
    assert "target median <= 1.1: met" in text
    define_row = next(line for line in text.splitlines() if "define returned" in line)
    assert define_row.split()[-2:] == ["0.010", "-"]
    share_row = next(line for line in text.splitlines() if "share of the 2 CPUs" in line)
    assert share_row.split()[-2:] == ["0.500", "-"]


def test_count_qemus_counts_by_comm(tmp_path: Path) -> None:
    for pid, comm in ((10, "qemu-system-x86\n"), (11, "python3\n"), (12, "qemu-system-aar\n")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm)
    (tmp_path / "self").mkdir()
    assert fs.count_qemus(tmp_path) == 2
