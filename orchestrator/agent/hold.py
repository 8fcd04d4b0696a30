"""Which run holds this machine, for as long as its controller's SSH session lives.

`hold` takes an flock on STATE_DIR/machine.lock, writes the holder's run id into the
file, prints one JSON line, and waits for EOF on stdin: the controller keeps the pipe
open, so the lock is released when the controller closes it, dies, or loses the
machine (sshd closes the session). A second run finds the lock taken and is told
which run has the machine; `clean` on the machine leaves that run's state alone.

A kexec or reboot wipes /run: the holder goes with the old kernel, and the run takes
the machine again once it is back.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from .fs import STATE_DIR

BUSY_RC = 3


def lock_file(state_dir: Path = STATE_DIR) -> Path:
    return state_dir / "machine.lock"


def _open(state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    return os.open(lock_file(state_dir), os.O_RDWR | os.O_CREAT, 0o644)


def _record(fd: int) -> dict[str, object]:
    os.lseek(fd, 0, os.SEEK_SET)
    with contextlib.suppress(ValueError):
        return dict(json.loads(os.read(fd, 4096) or b"{}"))
    return {}


def holder(state_dir: Path = STATE_DIR) -> str | None:
    """The run id that holds the machine now, or None when no live controller does."""
    if not lock_file(state_dir).exists():
        return None
    fd = _open(state_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return str(_record(fd).get("run_id") or "?")
        return None
    finally:
        os.close(fd)


def _lock_exclusive(fd: int, patience_s: float = 1.0) -> bool:
    """The exclusive lock, or False when a holder keeps it. Tried for a moment: `holder`
    (a `clean` elsewhere) takes the lock shared for microseconds, and that is not a run."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def hold(run_id: str, controller: str, state_dir: Path = STATE_DIR) -> int:
    """Hold the machine for run_id until stdin closes; BUSY_RC when another run has it."""
    fd = _open(state_dir)
    try:
        if not _lock_exclusive(fd):
            print(json.dumps({"busy": _record(fd)}), flush=True)
            return BUSY_RC
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"run_id": run_id, "controller": controller}).encode(), 0)
        print(json.dumps({"held": run_id}), flush=True)
        while sys.stdin.buffer.read(4096):
            pass
        os.ftruncate(fd, 0)
        return 0
    finally:
        os.close(fd)
