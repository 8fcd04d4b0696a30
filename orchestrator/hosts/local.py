"""This machine as a trial host: the host agent's functions called in-process, its
sampler and collector as child processes, workloads as local processes, guests
through the local libvirtd."""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import fleet, integrity, triggers
from orchestrator.agent import enough, fs, ksm
from orchestrator.attribution import Window
from orchestrator.errors import HostError
from orchestrator.hosts.base import EventFn, Proc, usable_stop_rule
from orchestrator.hosts.methods import HostKind
from orchestrator.integrity import Verification
from orchestrator.sampling import Collector, Sampler
from orchestrator.spec import HostWorkload, Migrate, Reclaim, StopWhenTight, Workload


def ksm_saved_path(run_id: str) -> Path:
    """Where a run keeps the host's own KSM knobs while its settings are in force."""
    return fs.STATE_DIR / f"ksm-{run_id}.json"


def restore_ksm_or_raise(path: Path) -> None:
    errors = ksm.restore_ksm(path)
    if errors:
        raise HostError("KSM restore: " + "; ".join(errors))


class LocalHost:
    """The machine densitylab runs on; `facts` are the doctor's, probed once per run."""

    kind: HostKind = "local"
    label = "this machine"
    guests = True
    libvirt_uri: str | None = fleet.URI

    def __init__(self, run_id: str, facts: dict[str, Any], accel: str, sample_interval_s: float):
        self.run_id = run_id
        self._facts = facts
        self.accel = accel
        self.poll_s = min(0.25, sample_interval_s / 2)
        self.trial_dir = Path(".")
        self.sampler: Sampler | None = None
        self.collector: Collector | None = None
        self.watch: enough.WatchFactory | None = None  # the stopping rule, while collecting
        self._copies: dict[str, triggers.HostProcess] = {}

    def open(self, kernel: str, stack: ExitStack, trial_dir: Path) -> list[tuple[str, str]]:
        # This machine runs the one kernel it booted: the spec refuses any other label.
        self.trial_dir = trial_dir
        self.sampler = self.collector = None
        self._copies = {}
        return []

    def facts(self) -> dict[str, Any]:
        return self._facts

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def sync_clock(self) -> int:
        return time.monotonic_ns()

    def ksm_apply(self, knobs: Mapping[str, int | str], stack: ExitStack) -> None:
        saved = ksm_saved_path(self.run_id)
        ksm.apply_ksm(dict(knobs), saved)
        stack.callback(restore_ksm_or_raise, saved)

    def ksm_set_run(self, value: int) -> None:
        ksm.write_knob(ksm.KSM_DIR, "run", str(value))

    def ksm_knobs(self) -> dict[str, str]:
        return ksm.read_ksm_knobs()

    def start_host_copies(
        self, w: HostWorkload, vmas: int, seed: int, stack: ExitStack, out_dir: Path
    ) -> list[Proc]:
        """The copies share one memory cgroup of the run (what `clean` sweeps here)."""
        started = triggers.start_host_workload(w, vmas, seed, self.run_id, stack, out_dir)
        procs = []
        for i, p in enumerate(started):
            name = f"host-dlfill-{i}"
            self._copies[name] = p
            pattern = "one-content" if p.done.get("one_content") else "distinct"
            procs.append(
                Proc(name, p.pid, "host-copy", pattern, p.done, f"densitylab-{self.run_id}")
            )
        return procs

    def start_fleet_processes(
        self, w: Workload, count: int, seed: int, stack: ExitStack
    ) -> list[Proc]:
        raise HostError("this machine runs the fleet as guests, not as processes")

    def wait_filled(self, procs: list[Proc], timeout_s: float) -> None:
        pass  # host copies are waited for when they start

    def scramble(self, procs: list[Proc]) -> None:
        triggers.scramble_host_workload([self._copies[p.name] for p in procs])

    def verify(self, procs: list[Proc]) -> list[Verification]:
        return integrity.verify_host_workload([self._copies[p.name] for p in procs])

    def start_sampler(self, pids: Mapping[str, int], interval_s: float, stack: ExitStack) -> None:
        out = self.trial_dir / "samples.jsonl"
        self.sampler = stack.enter_context(Sampler(out, pids, interval_s))

    def samples(self) -> list[dict[str, Any]]:
        return self.sampler.poll() if self.sampler is not None else []

    def start_collector(
        self,
        method: str,
        tag: str,
        stack: ExitStack,
        event: EventFn,
        stop_rule: StopWhenTight | None = None,
    ) -> None:
        out = self.trial_dir / "latency.jsonl"
        self.collector = stack.enter_context(Collector(out, method, tag))
        rule = usable_stop_rule(method, stop_rule, event)
        self.watch = None if rule is None else walk_watch_factory(out, rule)
        stack.callback(setattr, self, "watch", None)

    def latency(self) -> pd.DataFrame:
        assert self.collector is not None
        return self.collector.samples()

    def migrate(
        self, cfg: Migrate, targets: dict[str, int], repeat: int, event: EventFn
    ) -> list[Window]:
        nodes = int(self._facts["numa"]["value"])
        return triggers.migrate_once(cfg, nodes, targets, repeat, event, self.run_id, self.watch)

    def provide_swap(self, cfg: Reclaim, stack: ExitStack, event: EventFn) -> None:
        triggers.provide_swap(cfg, self.run_id, stack, event)

    def reclaim(
        self, cfg: Reclaim, targets: dict[str, int], stack: ExitStack, event: EventFn
    ) -> list[Window]:
        cgroup_kind = str(self._facts["cgroup"]["value"])
        return triggers.reclaim_once(cfg, cgroup_kind, targets, stack, event, self.watch)

    def close(self) -> list[str]:
        return []  # nothing outlives a trial here

    def keep_files(self, trial_dir: Path) -> None:
        pass  # the sampler and collector write into the trial directory already


def walk_watch_factory(out: Path, rule: StopWhenTight) -> enough.WatchFactory:
    """A new watch per window over the collector's raw file (trace.run_fentry_collector):
    the walks are this process's, which calls move_pages and writes memory.reclaim."""
    raw = out.with_name(out.name + ".raw")
    return lambda: enough.WalkWatch(raw, rule.ci_pct, rule.min_walks)
