"""A host driven through the host agent over a transport: a lab-host VM (the guest
agent) or a lab machine (SSH). Every step is a host-agent subcommand (`spawn`,
`ksm-apply`, `trace`, `swap-on`, `reclaim`, ...), so nothing about the transport is
special-cased. Under TCG a nested fleet would be ~60x slower, so the fleet runs as
processes with the guests' fill patterns (labelled `host-process` in the data)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from orchestrator import agentship, dlfill, images, integrity
from orchestrator.agent.enough import stop_detail
from orchestrator.attribution import Window
from orchestrator.errors import HostError
from orchestrator.hosts.base import EventFn, Proc, ProcKind, usable_stop_rule
from orchestrator.integrity import Verification
from orchestrator.spec import HostWorkload, Migrate, Reclaim, StopWhenTight, Workload

AGENT_PATH = agentship.REMOTE_AGENT_PATH  # the agent as one file (a zipapp)
DLFILL_PATH = "/usr/local/bin/dlfill"
WORK = "/run/densitylab"
LATENCY_COLUMNS = [
    "ts_ns", "duration_ns", "method", "lower_bound", "pid", "comm", "caller", "rmap_one"
]  # fmt: skip


class Transport(Protocol):
    """How commands and files reach the host. run raises HostError (or GuestError)
    naming argv, exit code and the tail of stderr when argv fails."""

    name: str

    def run(self, argv: list[str], timeout_s: float = 120) -> str: ...
    def read(self, path: str) -> bytes: ...
    def write(self, path: str, data: bytes, mode: int) -> None: ...


def agent_argv(*args: str) -> list[str]:
    """The argv that runs one host-agent subcommand on a host."""
    return ["/usr/bin/python3", AGENT_PATH, *args]


class AgentShell:
    """Commands and host-agent subcommands over a transport (what the checks need)."""

    def __init__(self, t: Transport):
        self.t = t

    def run(self, argv: list[str], timeout_s: float = 120) -> str:
        return self.t.run(argv, timeout_s)

    def agent(self, *args: str, timeout_s: float = 120) -> str:
        return self.t.run(agent_argv(*args), timeout_s)


def ship_tools(t: Transport) -> None:
    """The host agent and the workload program: all a host needs from us."""
    t.run(["/bin/mkdir", "-p", str(Path(AGENT_PATH).parent), WORK])
    t.write(AGENT_PATH, agentship.agent_zipapp().read_bytes(), 0o644)
    # Before any other agent call: each would compile every module again (agent/pyc.py).
    t.run(agent_argv("precompile", "--archive", AGENT_PATH), 120)
    # The same static binary as the tiny guest's and this machine's.
    t.write(DLFILL_PATH, images.host_dlfill().read_bytes(), 0o755)


def pattern_argv(w: Workload, seed: int, instance: int) -> list[str]:
    """dlfill with the guests' fill pattern, held until stopped."""
    return [
        DLFILL_PATH,
        *("--mib", str(w.mib), "--dup", str(w.dup), "--zero", str(w.zero)),
        *("--unique", str(w.unique), "--volatile", str(w.volatile)),
        *("--volatile-rate", str(w.volatile_rate_pps), "--seed", str(seed)),
        *("--instance", str(instance), "--mergeable", "--hold"),
        *(["--one-content"] if w.pattern == "one-content" else []),
    ]


class AgentHost:
    """Host operations as host-agent subcommands. Subclasses provide `open` (boot or
    reach the host, set `self.t`, ship the tools)."""

    guests = False  # the fleet runs as processes (see the module's docstring)
    libvirt_uri: str | None = None
    poll_s = 2.0  # each read is a round trip through the transport

    def __init__(self, run_id: str, work: str = WORK):
        self.run_id = run_id
        self.work = work  # the trial's files on the host
        self.tag = run_id.replace("-", "_")
        self.t: Transport | None = None
        self._facts: dict[str, Any] | None = None
        self._offset_ns = 0
        self._samples: list[dict[str, Any]] = []
        self._sample_bytes = 0
        self._procs: list[str] = []
        self._tight_flags: list[str] = []  # the stopping rule, for this trial's collector
        self._kept: dict[str, bytes] = {}  # record files already read this trial

    # -------------------------------------------------------------- plumbing

    @property
    def transport(self) -> Transport:
        if self.t is None:
            raise HostError(f"{type(self).__name__}: used before open()")
        return self.t

    def agent(self, *args: str, timeout_s: float = 120) -> str:
        return self.transport.run(agent_argv(*args), timeout_s)

    def saved(self, kind: str) -> str:
        """Where the host's own state (KSM knobs, swap) is kept while ours is in force:
        the agent's state folder, named as the agent's `clean` looks for it."""
        return f"{WORK}/{kind}-{self.run_id}.json"

    def read_text(self, path: str) -> str:
        return self.transport.read(path).decode(errors="replace")

    def reset(self) -> None:
        """Forget the previous trial's state (a host may serve several trials)."""
        self._facts = None
        self._samples, self._sample_bytes, self._procs = [], 0, []
        self._kept = {}

    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            self._facts = json.loads(
                self.agent("probe", timeout_s=180)
            )  # BPF too: a lab host allows it
        return self._facts

    def sync_clock(self) -> int:
        """The host's CLOCK_MONOTONIC, read through the transport; also sets the offset
        now_ns() uses between reads (one round trip costs seconds in a TCG VM, so events
        are stamped from this clock plus the offset, within half a round trip)."""
        before = time.monotonic_ns()
        remote = int(self.agent("now").strip())
        after = time.monotonic_ns()
        self._offset_ns = remote - (before + after) // 2
        return remote

    def now_ns(self) -> int:
        return time.monotonic_ns() + self._offset_ns

    # -------------------------------------------------------------- KSM

    def ksm_apply(self, knobs: Mapping[str, int | str], stack: ExitStack) -> None:
        self.agent(
            "ksm-apply", "--saved", self.saved("ksm"), *[f"{k}={v}" for k, v in knobs.items()]
        )
        stack.callback(self.agent, "ksm-restore", "--saved", self.saved("ksm"))

    def ksm_set_run(self, value: int) -> None:
        # ksm-apply keeps the host's values saved by the first call: only `run` changes.
        self.agent("ksm-apply", "--saved", self.saved("ksm"), f"run={value}")

    def ksm_knobs(self) -> dict[str, str]:
        return dict(self.facts()["ksm"].get("knobs", {})) | self._knobs_now()

    def _knobs_now(self) -> dict[str, str]:
        out = self.transport.run(
            ["/bin/sh", "-c", "cd /sys/kernel/mm/ksm && grep -H . * 2>/dev/null"], 30
        )
        knobs = {}
        for line in out.splitlines():
            name, _, value = line.partition(":")
            knobs[name] = value.strip()
        return knobs

    # -------------------------------------------------------------- workloads

    def spawn(
        self, name: str, argv: list[str], stack: ExitStack, kind: ProcKind, pattern: str
    ) -> Proc:
        """Start argv detached in a memory cgroup of its own (so reclaim can act on one
        workload at a time), its memory on node 0 (so 0 -> 1 moves every page)."""
        cgroup = f"densitylab-{self.tag}-{name}"
        nodes = int(self.facts()["numa"]["value"])
        bind = ["/usr/bin/numactl", "--membind=0", "--"] if nodes > 1 else []
        pid = self.agent(
            "spawn",
            *("--out", f"{self.work}/{name}.out", "--pidfile", f"{self.work}/{name}.pid"),
            *("--cgroup", cgroup, "--"),
            *bind,
            *argv,
        )
        if not self._procs:  # one round trip stops them all (and removes their cgroups)
            stack.callback(self._stop_procs)
        self._procs.append(name)
        return Proc(name, int(pid.strip()), kind, pattern, {}, cgroup)

    def start_host_copies(
        self, w: HostWorkload, vmas: int, seed: int, stack: ExitStack, out_dir: Path
    ) -> list[Proc]:
        procs = [
            self.spawn(
                f"fragmented-{i}",
                images.fragmented_copy_argv(
                    DLFILL_PATH, w.mib, vmas, seed, i, one_content=w.pattern == "one-content"
                ),
                stack,
                "host-copy",
                w.pattern,
            )
            for i in range(w.copies)
        ]
        self.wait_filled(procs, 300)
        return procs

    def start_fleet_processes(
        self, w: Workload, count: int, seed: int, stack: ExitStack
    ) -> list[Proc]:
        return [
            self.spawn(f"pattern-{i}", pattern_argv(w, seed, i), stack, "host-process", w.pattern)
            for i in range(count)
        ]

    def wait_filled(self, procs: list[Proc], timeout_s: float) -> None:
        for p in procs:
            p.done = self.wait_done_line(p.name, timeout_s)

    def wait_done_line(self, name: str, timeout_s: float) -> dict[str, Any]:
        path = f"{self.work}/{name}.out"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.read_text(path).splitlines():
                if (done := dlfill.done_record(line)) is not None:
                    return done
                if line.startswith("dlfill: "):
                    raise HostError(f"{self.transport.name}: {path}: {line}")
            time.sleep(0.5)
        raise HostError(
            f"{self.transport.name}: {path}: no DLFILL DONE line within {timeout_s:.0f}s"
        )

    def scramble(self, procs: list[Proc], timeout_s: float = 300) -> None:
        """SIGUSR1 each dlfill (its pages become unique) and wait for its confirmation."""
        out = {p.name: f"{self.work}/{p.name}.out" for p in procs}
        before = {n: self.read_text(path).count("DLFILL SCRAMBLED") for n, path in out.items()}
        self.transport.run(["/usr/bin/kill", "-USR1", *[str(p.pid) for p in procs]])
        deadline = time.monotonic() + timeout_s
        for n, path in out.items():
            while self.read_text(path).count("DLFILL SCRAMBLED") <= before[n]:
                if time.monotonic() > deadline:
                    raise HostError(f"{self.transport.name}: {n} did not confirm the scramble")
                time.sleep(0.5)

    def verify(self, procs: list[Proc]) -> list[Verification]:
        """Every dlfill checks its pages, side by side; one agent call signals them and
        waits for their lines on the host."""
        out = self.agent(
            "verify",
            *[f"--proc={p.name}={p.pid}:{self.work}/{p.name}.out" for p in procs],
            *("--timeout-s", str(integrity.VERIFY_TIMEOUT_S)),
            timeout_s=integrity.VERIFY_TIMEOUT_S + 60,
        )
        answers = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [integrity.parse_verified(a["line"], a["workload"]) for a in answers]

    def _stop_procs(self) -> None:
        names = list(reversed(self._procs))
        self.agent(
            "stop",
            *[f"--pidfile={self.work}/{n}.pid" for n in names],
            *[f"--cgroup=densitylab-{self.tag}-{n}" for n in names],
            timeout_s=300,
        )

    # -------------------------------------------------------------- sampling

    def start_sampler(self, pids: Mapping[str, int], interval_s: float, stack: ExitStack) -> None:
        self.agent(
            "spawn",
            *("--out", f"{self.work}/sampler.log", "--pidfile", f"{self.work}/sampler.pid", "--"),
            *("/usr/bin/python3", AGENT_PATH, "sample", "--interval-s", str(interval_s)),
            *("--out", f"{self.work}/samples.jsonl"),
            *[f"--pid={n}={p}" for n, p in pids.items()],
        )
        stack.callback(self._stop_sampler)

    def _stop_sampler(self) -> None:
        self.agent("stop", "--pidfile", f"{self.work}/sampler.pid")
        self.samples()  # the last lines

    def samples(self) -> list[dict[str, Any]]:
        """Every sample so far; reads only the bytes added since the last call."""
        try:
            chunk = self.transport.run(
                ["/usr/bin/tail", "-c", f"+{self._sample_bytes + 1}", f"{self.work}/samples.jsonl"],
                60,
            )
        except HostError:
            return self._samples  # no file yet
        whole = chunk[: chunk.rfind("\n") + 1]  # a line being written is read next time
        self._sample_bytes += len(whole.encode())
        self._samples += [json.loads(line) for line in whole.splitlines() if line.strip()]
        return self._samples

    # -------------------------------------------------------------- latency

    def start_collector(
        self,
        method: str,
        tag: str,
        stack: ExitStack,
        event: EventFn,
        stop_rule: StopWhenTight | None = None,
    ) -> None:
        """Start the agent's latency collector and wait until its probes are in place."""
        log = f"{self.work}/collector.log"
        rule = usable_stop_rule(method, stop_rule, event)
        self._tight_flags = (
            []
            if rule is None
            else [
                *("--tight-raw", f"{self.work}/latency.jsonl.raw"),
                *("--tight-ci-pct", str(rule.ci_pct), "--tight-min-walks", str(rule.min_walks)),
            ]
        )
        self.agent(
            "spawn",
            *("--out", log, "--pidfile", f"{self.work}/collector.pid", "--"),
            *("/usr/bin/python3", AGENT_PATH, "trace", "--method", method),
            *("--out", f"{self.work}/latency.jsonl", "--tag", tag),
        )
        stack.callback(self._stop_collector, event)
        deadline = time.monotonic() + 60
        while "collector: ready" not in self.read_text(log):
            if time.monotonic() > deadline:
                raise HostError(
                    f"{self.transport.name}: collector did not start: {self.read_text(log)[-500:]}"
                )
            time.sleep(0.3)

    def _stop_collector(self, event: EventFn) -> None:
        """Give the collector time to drain its buffer (a slow VM parses ~10^4 events/s);
        one that had to be killed is said in the trial's events."""
        self._tight_flags = []
        self.agent(
            "stop", "--pidfile", f"{self.work}/collector.pid", "--grace-s", "600", timeout_s=660
        )
        if "collector: stopped" not in self.read_text(f"{self.work}/collector.log"):
            event("collector-killed", "did not drain within 600 s: latency samples are incomplete")

    def latency(self) -> pd.DataFrame:
        try:
            data = self.transport.read(f"{self.work}/latency.jsonl")
        except HostError:
            data = b""
        self._kept["latency.jsonl"] = data  # keep_files copies it without a second read
        text = data.decode(errors="replace")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return pd.DataFrame(rows, columns=LATENCY_COLUMNS)

    # -------------------------------------------------------------- triggers

    def migrate(
        self, cfg: Migrate, targets: dict[str, int], repeat: int, event: EventFn
    ) -> list[Window]:
        """One NUMA pass (0 -> 1, then back), one process at a time, each window on the
        host's clock: every walk in it is for that process's pages. The agent reports
        its own window: each extra round trip costs seconds in a TCG lab host."""
        if int(self.facts()["numa"]["value"]) < 2:
            raise HostError(f"{self.transport.name} has one NUMA node: migrate needs two or more")
        src, dst = (0, 1) if repeat % 2 == 0 else (1, 0)
        t0 = time.monotonic()
        if cfg.pages is None:
            windows = [
                self._migrate_all(name, pid, src, dst, event) for name, pid in targets.items()
            ]
        else:
            windows = self._move_sampled(cfg.pages, targets, dst, event)
        event("migrated", f"numa {src}->{dst} in {time.monotonic() - t0:.2f}s", windows[-1].end_ns)
        return windows

    def _migrate_all(self, name: str, pid: int, src: int, dst: int, event: EventFn) -> Window:
        """Every page of one process with migratepages, timed by two clock reads."""
        start = self.sync_clock()
        self.transport.run(["/usr/bin/migratepages", str(pid), str(src), str(dst)], 3600)
        end = self.sync_clock()
        event("migrated-process", f"{name}: all pages", end)
        return Window(start, end, name, "migrate")

    def _move_sampled(
        self, pages: int, targets: dict[str, int], dst: int, event: EventFn
    ) -> list[Window]:
        """A sample of each process's pages with move_pages, every process in one agent
        call (one line and window each): a call costs seconds in a TCG lab host."""
        names = {pid: name for name, pid in targets.items()}
        out = self.agent(
            "move-pages",
            *[f"--pid={pid}" for pid in targets.values()],
            *("--pages", str(pages), "--node", str(dst)),
            *self._tight_flags,
            timeout_s=3600,
        )
        windows = []
        for line in out.splitlines():
            moved = json.loads(line)
            name = names[moved.pop("pid")]
            start, end = moved.pop("start_ns"), moved.pop("end_ns")
            windows.append(Window(start, end, name, "migrate"))
            event("migrated-process", f"{name}: move_pages {json.dumps(moved)}", end)
        return windows

    def provide_swap(self, cfg: Reclaim, stack: ExitStack, event: EventFn) -> None:
        saved = self.saved("swap")
        self.agent("swap-on", "--kind", cfg.swap, "--mib", str(cfg.swap_mib), "--saved", saved)
        stack.callback(self.agent, "swap-off", "--saved", saved, timeout_s=900)
        event("swap-on", f"{cfg.swap} {cfg.swap_mib} MiB")

    def reclaim(
        self, cfg: Reclaim, targets: dict[str, int], stack: ExitStack, event: EventFn
    ) -> list[Window]:
        """memory.reclaim on one workload's cgroup at a time, in recorded windows: every
        cgroup in one agent call (one line and window each)."""
        cgroups = {f"densitylab-{self.tag}-{name}": name for name in targets}
        out = self.agent(
            "reclaim",
            "--json",
            *[f"--cgroup={cg}" for cg in cgroups],
            *("--mib", str(cfg.reclaim_mib)),
            *self._tight_flags,
            timeout_s=3600,
        )
        windows = []
        for line in out.splitlines():
            r = json.loads(line)
            name = cgroups[r["cgroup"]]
            windows.append(Window(r["start_ns"], r["end_ns"], name, "reclaim"))
            detail = f"{name}: memory.reclaim {cfg.reclaim_mib} MiB: {r['result']}"
            if "stopped" in r:
                detail += f" ({stop_detail(r)})"
            event("reclaimed", detail, r["end_ns"])
        return windows

    def keep_files(self, trial_dir: Path) -> None:
        """Copies of the host's record files in the run directory (missing ones are fine)."""
        for name in ("samples.jsonl", "latency.jsonl", "collector.log"):
            try:
                data = self._kept.pop(name, None) or self.transport.read(f"{self.work}/{name}")
            except HostError:
                continue
            trial_dir.mkdir(parents=True, exist_ok=True)
            (trial_dir / f"lab-{name}").write_bytes(data)
