"""The one place that runs external commands: argument lists, timeouts, useful errors."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# What other modules need of subprocess (result and process types, stream constants, the
# timeout exception), so that this stays the one module that imports it (see
# tests/unit/test_import_boundary.py).
from subprocess import DEVNULL as DEVNULL
from subprocess import PIPE as PIPE
from subprocess import STDOUT as STDOUT
from subprocess import CompletedProcess as CompletedProcess
from subprocess import Popen as Popen
from subprocess import TimeoutExpired as TimeoutExpired

from orchestrator.errors import CommandError

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 2000


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout_s: float = 300,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion and return it; stdout and stderr are captured as text.

    Raises CommandError (with argv, rc and the tail of stderr) when the command exits
    non-zero (if check) or outlives timeout_s; a missing binary is rc 127.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("run %s", args)
    try:
        cp = subprocess.run(
            args,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-STDERR_TAIL_CHARS:]
        tail_s = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise CommandError(args, None, tail_s, timed_out=True) from e
    except FileNotFoundError as e:
        raise CommandError(args, 127, str(e)) from e
    if check and cp.returncode != 0:
        raise CommandError(args, cp.returncode, cp.stderr[-STDERR_TAIL_CHARS:])
    return cp


def spawn_group(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: int | None = None,
    stderr: int | None = None,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived helper in its own process group, so stop_group can end it whole.

    preexec runs in the child just before exec (e.g. to join a cgroup before the
    program touches any memory)."""
    return subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
        preexec_fn=preexec,
    )


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> int | None:
    """SIGTERM the helper's process group, SIGKILL it after grace_s; returns its rc."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=grace_s)
    except ProcessLookupError:
        return proc.wait(timeout=grace_s)


def start_session(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """A command that lives as long as we keep its stdin open (a remote lock held over
    SSH): its own process group, stdout piped for its answer, stderr dropped."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def first_line(session: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    """The session's first line of output, or b"" when none came in time."""
    assert session.stdout is not None
    ready, _, _ = select.select([session.stdout], [], [], timeout_s)
    return session.stdout.readline() if ready else b""


def end_session(session: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Close the session's stdin (it should exit by itself), then stop_group if it lingers."""
    with contextlib.suppress(OSError):
        assert session.stdin is not None
        session.stdin.close()
    try:
        session.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        stop_group(session)
