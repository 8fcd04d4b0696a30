"""Run locks: which densitylab run owns this host, and whether its owner is still alive.

Each running `densitylab run` holds STATE_DIR/runs/<run-id>.lock: a JSON record of its
owner (pid, the process's start time from /proc/PID/stat field 22, the boot id, run id,
spec name) plus an flock on the file for as long as the process lives. `clean` holds
the same lock (role "clean") while it sweeps a run, so a resume and a clean of one run
never overlap.

An owner is gone when its pid is dead, the process with that pid started at another
time (the pid was reused) or the host has rebooted since (another boot id). A record
whose flock is held counts as live whatever it says: its holder may be writing it.

Stdlib only, like the host agent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.agent import fs
from orchestrator.errors import HostBusy, HostError

PROC = Path("/proc")
BOOT_ID = PROC / "sys" / "kernel" / "random" / "boot_id"
MUTEX_WAIT_S = 30.0


def runs_dir(state_dir: Path | None = None) -> Path:
    return (state_dir or fs.STATE_DIR) / "runs"


def lock_path(run_id: str, state_dir: Path | None = None) -> Path:
    return runs_dir(state_dir) / f"{run_id}.lock"


def boot_id() -> str:
    return BOOT_ID.read_text().strip()


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot); None when pid is gone.

    The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    """
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


@dataclass(frozen=True)
class Owner:
    """Who holds (or held) a run lock."""

    pid: int
    start_time: int
    boot_id: str
    run_id: str
    spec_name: str
    role: str = "run"  # "run", "remote" (a run on lab machines, not on this host) or "clean"
    since: str = ""

    @classmethod
    def me(cls, run_id: str, spec_name: str, role: str = "run") -> Owner:
        pid = os.getpid()
        st = start_time(pid)
        assert st is not None  # our own /proc entry exists
        return cls(
            pid,
            st,
            boot_id(),
            run_id,
            spec_name,
            role,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

    def describe(self) -> str:
        what = "being cleaned" if self.role == "clean" else f"spec {self.spec_name}"
        return f"run {self.run_id} ({what}, pid {self.pid}, since {self.since or '?'})"


def owner_alive(o: Owner, proc: Path = PROC, boot: str | None = None) -> bool:
    """The liveness rule: same boot, pid alive, and that pid started when the owner did."""
    if o.boot_id != (boot if boot is not None else boot_id()):
        return False
    return start_time(o.pid, proc) == o.start_time


def parse_owner(text: str) -> Owner | None:
    """An Owner from a lock file's text; None for an empty or half-written one."""
    try:
        data: dict[str, Any] = json.loads(text)
        return Owner(
            int(data["pid"]),
            int(data["start_time"]),
            str(data["boot_id"]),
            str(data["run_id"]),
            str(data["spec_name"]),
            str(data.get("role", "run")),
            str(data.get("since", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


def flock_held(path: Path) -> bool:
    """True when some open file (in any process, this one included) holds the flock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class LockState:
    """One lock file as found: its owner record (if readable) and whether it is live."""

    run_id: str
    path: Path
    owner: Owner | None
    live: bool

    def describe(self) -> str:
        return self.owner.describe() if self.owner else f"run {self.run_id} (owner unknown)"


def inspect(path: Path) -> LockState:
    run_id = path.name.removesuffix(".lock")
    try:
        owner = parse_owner(path.read_text())
    except FileNotFoundError:
        return LockState(run_id, path, None, False)
    live = flock_held(path) or (owner is not None and owner_alive(owner))
    return LockState(run_id, path, owner, live)


def survey(state_dir: Path | None = None) -> dict[str, LockState]:
    """Every run lock on this host, by run id."""
    d = runs_dir(state_dir)
    if not d.is_dir():
        return {}
    return {s.run_id: s for s in (inspect(p) for p in sorted(d.glob("*.lock")))}


class RunLock:
    """A held run lock: an open, flocked file whose record names us. close() removes it."""

    def __init__(self, path: Path, fd: int, owner: Owner):
        self.path, self.fd, self.owner = path, fd, owner

    def close(self) -> None:
        if self.fd < 0:
            return
        # Unlink while still holding the flock: whoever opens the path next gets a new
        # file, and open_locked's inode check sends a racer on the old one round again.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_record(fd: int, owner: Owner) -> None:
    data = (json.dumps(asdict(owner), sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def open_locked(path: Path) -> int | None:
    """Open (creating if needed) and flock path without waiting; None if someone holds it.

    After the flock, the path must still name the file we locked: a holder that unlinked
    it on release leaves us a lock on a file nobody else will ever see, so try again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def take(run_id: str, owner: Owner, state_dir: Path | None = None) -> RunLock:
    """Hold run_id's lock as owner, adopting it from a gone owner. Raises HostBusy when
    the lock is held, or names an owner that is still alive."""
    path = lock_path(run_id, state_dir)
    fd = open_locked(path)
    if fd is None:
        raise HostBusy(run_id, inspect(path).describe(), "run is live")
    previous = parse_owner(os.pread(fd, 1 << 16, 0).decode(errors="replace"))
    if previous is not None and owner_alive(previous) and previous.pid != owner.pid:
        os.close(fd)  # alive without its flock: never ours to take
        raise HostBusy(run_id, previous.describe(), "run is live")
    write_record(fd, owner)
    return RunLock(path, fd, owner)


@contextlib.contextmanager
def host_mutex(state_dir: Path | None = None, wait_s: float = MUTEX_WAIT_S) -> Iterator[None]:
    """A short host-wide critical section (check-then-take of a run lock, saving and
    restoring the host's KSM knobs). The file is never removed, so no inode race."""
    path = (state_dir or fs.STATE_DIR) / "runs.mutex"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HostError(
                        f"{path}: held by another densitylab for more than {wait_s:.0f}s"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def acquire_run(
    run_id: str, spec_name: str, state_dir: Path | None = None, role: str = "run"
) -> RunLock:
    """Take the lock of a run about to start (or resume). Raises HostBusy naming the
    other run when a live one owns the host (KSM is host-wide: two runs would corrupt
    each other's figures), or when run_id itself is live or being cleaned; HostError
    when the state folder cannot be written (not root). A run on lab machines (role
    "remote") leaves this host's KSM alone: it neither waits for a local run nor
    blocks one, and `clean` still sees it live."""
    try:
        with host_mutex(state_dir):
            for state in survey(state_dir).values():
                if state.run_id == run_id or not state.live:
                    continue
                local = state.owner is None or state.owner.role == "run"
                if local and role == "run":
                    raise HostBusy(
                        state.run_id,
                        state.describe(),
                        "another densitylab run is live on this host (KSM is host-wide)",
                    )
            return take(run_id, Owner.me(run_id, spec_name, role=role), state_dir)
    except OSError as e:
        where = e.filename or runs_dir(state_dir)
        raise HostError(f"{where}: cannot take the run lock: {e.strerror or e}") from e


def claim_gone(run_id: str, state_dir: Path | None = None) -> RunLock | None:
    """Hold a run's lock for cleaning it; None when its owner is live (or another clean
    holds it). A run that never had a lock file gets one for the duration."""
    try:
        return take(run_id, Owner.me(run_id, "", role="clean"), state_dir)
    except HostBusy:
        return None
