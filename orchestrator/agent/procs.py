"""Processes the agent starts for a remote caller (detached, in a cgroup of ours) and
the agent's own samplers and collectors, found in /proc (for `densitylab clean`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .fs import PROC, AgentError, read_text, write_text
from .memory import memcg_add_pid, memcg_create


def find_pid_by_comm(comm: str, proc: Path = PROC) -> int | None:
    for d in proc.iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == comm:
                    return int(d.name)
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn_detached(argv: list[str], out: Path, pidfile: Path, cgroup: str | None = None) -> int:
    """Start argv detached (its own session, output to `out`), optionally inside a memory
    cgroup of ours joined before exec; write its pid. For remote hosts, where the
    caller's channel (a guest-agent exec) must return at once."""
    cg = memcg_create(cgroup, read_text(PROC / "self" / "mounts")) if cgroup else None
    pid = os.fork()
    if pid == 0:  # child: new session, then exec (never returns)
        os.setsid()
        if cg is not None:
            memcg_add_pid(cg, os.getpid())
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.execvp(argv[0], argv)
    write_text(pidfile, str(pid))
    return pid


def stop_pidfile(pidfile: Path, grace_s: float = 30) -> None:
    """SIGTERM the process (group) of a pidfile and wait for it; SIGKILL after grace_s."""
    if not pidfile.exists():
        return
    pid = int(read_text(pidfile))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


VERIFIED_PREFIX = "DLFILL VERIFIED "  # dlfill's answer to SIGUSR2 (orchestrator.integrity)


def verify_workloads(
    procs: dict[str, tuple[int, Path]],
    timeout_s: float,
    poll_s: float = 0.05,
    alive: Callable[[int], bool] = pid_alive,
) -> list[tuple[str, str]]:
    """SIGUSR2 every dlfill (name -> pid, its output file) at once, so they check their
    pages side by side, and return each one's new DLFILL VERIFIED line. Done here, not
    by the caller over its transport: each of its reads is a round trip (the signals,
    the reads before and the polls cost ~3 s a check in a TCG lab host). `alive`: a
    parent passes its own test (a dead child of its stays a zombie until reaped)."""

    def lines(out: Path) -> list[str]:
        text = out.read_text(errors="replace") if out.exists() else ""
        return [ln for ln in text.splitlines() if ln.startswith(VERIFIED_PREFIX)]

    before = {name: len(lines(out)) for name, (_, out) in procs.items()}
    for name, (pid, _) in procs.items():
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            raise AgentError(
                f"{name} (pid {pid}) is not running: its pages cannot be verified"
            ) from None
    deadline = time.monotonic() + timeout_s
    found = []
    for name, (pid, out) in procs.items():
        while len(new := lines(out)) <= before[name]:
            if not alive(pid):
                raise AgentError(f"{name} (pid {pid}) exited before verifying its pages")
            if time.monotonic() > deadline:
                raise AgentError(f"{name} (pid {pid}): no verification within {timeout_s:.0f}s")
            time.sleep(poll_s)
        found.append((name, new[-1]))
    return found


def _flag(argv: list[str], name: str) -> str | None:
    """The value after `name` in argv (the last one if repeated), None if absent."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


class AgentHelper:
    """A host-agent sampler or collector process found in /proc, and which run it serves:
    its --out lies in results/<run-id>/trials/<trial>/, a collector's --tag is the run
    id with '_' for '-'."""

    def __init__(self, pid: int, argv: list[str]) -> None:
        self.pid = pid
        self.argv = argv
        self.out = _flag(argv, "--out")
        self.tag = _flag(argv, "--tag")
        parent = _flag(argv, "--parent-pid")
        self.parent_pid = int(parent) if parent and parent.isdigit() else None

    @property
    def run_id(self) -> str | None:
        """The run whose directory holds --out, when --out has the run store's shape."""
        if self.out is None:
            return None
        p = Path(self.out)
        return p.parent.parent.parent.name if p.parent.parent.name == "trials" else None

    def serves(self, run_id: str) -> bool:
        """Exact match only: a run id that is a substring of another run's is no match."""
        return bool(run_id) and (self.run_id == run_id or self.tag == run_id.replace("-", "_"))


def is_agent_argv(argv: list[str]) -> bool:
    """A command line that runs the agent: its zipapp (agent-HASH.pyz, agent.pyz), the
    package (`-m orchestrator.agent`) or the one-file agent of earlier versions (its
    helpers may outlive an upgrade)."""
    for a in argv[:4]:
        name = Path(a).name
        if (name.startswith("agent") and name.endswith(".pyz")) or name == "hostagent.py":
            return True
        if a == "orchestrator.agent":
            return True
    return False


def agent_helpers(proc: Path = PROC) -> list[AgentHelper]:
    """Every host-agent sampler and collector running here (but this process)."""
    me = os.getpid()
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        with contextlib.suppress(OSError):
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
            if not is_agent_argv(argv):
                continue
            if "sample" in argv or "trace" in argv:
                found.append(AgentHelper(int(d.name), argv))
    return found


def find_samplers(proc: Path = PROC, run_ids: Iterable[str] | None = None) -> list[int]:
    """Pids of host-agent samplers and collectors still running (their orchestrator may
    be gone); with run_ids, only those serving exactly one of those runs."""
    wanted = None if run_ids is None else list(run_ids)
    return [
        h.pid for h in agent_helpers(proc) if wanted is None or any(h.serves(r) for r in wanted)
    ]


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
