"""The Host interface the trial engine is written against, and what each kind offers.

A trial (orchestrator.engine.trial) never asks which kind of host it is on: it
calls these operations. What a backend cannot do is listed in hosts.methods, so that
the spec (and so `densitylab plan`) refuses it before anything is touched, with one
line naming the backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pandas as pd

from orchestrator.attribution import Window
from orchestrator.hosts.methods import HostKind
from orchestrator.integrity import Verification
from orchestrator.spec import HostWorkload, Migrate, Reclaim, StopWhenTight, Workload

ProcKind = Literal["host-copy", "host-process"]
EventFn = Any  # Callable[[str, str], None]: (event, detail)


@dataclass
class Proc:
    """A workload process on a host: a fragmented host copy or a guest-memory pattern
    process (how lab hosts stand in for guests). `done` is its DLFILL DONE line."""

    name: str
    pid: int
    kind: ProcKind
    pattern: str
    done: dict[str, Any] = field(default_factory=dict)
    cgroup: str | None = None  # its own memory cgroup, where it has one


class Host(Protocol):
    """One machine a trial runs on. Every operation that creates something registers
    its undo on the `stack` it is given."""

    kind: HostKind
    label: str  # for messages: "this machine", "lab VM dl-...", "machine lab1"
    poll_s: float  # how often reading samples is worth it (a remote read costs)
    guests: bool  # can this host run the fleet as guests (else as processes)?
    libvirt_uri: str | None
    accel: str  # how the trial's kernel runs: kvm, qemu (TCG), qemu+labvm, ...

    def open(self, kernel: str, stack: ExitStack, trial_dir: Path) -> list[tuple[str, str]]:
        """Make the host run `kernel` for this trial (boot a lab VM, switch a machine's
        kernel; nothing here) and ship the tools. Returns (event, detail) pairs worth
        recording (a boot retried, a kernel switch and its time)."""

    def facts(self) -> dict[str, Any]: ...
    def now_ns(self) -> int: ...
    def sync_clock(self) -> int:
        """The host's CLOCK_MONOTONIC read now (now_ns may estimate between reads)."""

    def ksm_apply(self, knobs: Mapping[str, int | str], stack: ExitStack) -> None: ...
    def ksm_set_run(self, value: int) -> None: ...
    def ksm_knobs(self) -> dict[str, str]: ...

    def start_host_copies(
        self, w: HostWorkload, vmas: int, seed: int, stack: ExitStack, out_dir: Path
    ) -> list[Proc]: ...
    def start_fleet_processes(
        self, w: Workload, count: int, seed: int, stack: ExitStack
    ) -> list[Proc]: ...
    def wait_filled(self, procs: list[Proc], timeout_s: float) -> None: ...
    def scramble(self, procs: list[Proc]) -> None: ...
    def verify(self, procs: list[Proc]) -> list[Verification]: ...

    def start_sampler(
        self, pids: Mapping[str, int], interval_s: float, stack: ExitStack
    ) -> None: ...
    def samples(self) -> list[dict[str, Any]]: ...

    def start_collector(
        self,
        method: str,
        tag: str,
        stack: ExitStack,
        event: EventFn,
        stop_rule: StopWhenTight | None = None,
    ) -> None: ...
    def latency(self) -> pd.DataFrame: ...

    def migrate(
        self, cfg: Migrate, targets: dict[str, int], repeat: int, event: EventFn
    ) -> list[Window]: ...
    def provide_swap(self, cfg: Reclaim, stack: ExitStack, event: EventFn) -> None: ...
    def reclaim(
        self, cfg: Reclaim, targets: dict[str, int], stack: ExitStack, event: EventFn
    ) -> list[Window]: ...

    def close(self) -> list[str]:
        """At the end of the run: remove what the host kept between trials (lab VMs),
        put a machine back on its own kernel; returns what was done."""

    def keep_files(self, trial_dir: Path) -> None:
        """Copy the host's own record files (samples, collector log) into the run."""


def usable_stop_rule(
    method: str, rule: StopWhenTight | None, event: EventFn
) -> StopWhenTight | None:
    """The stopping rule where the collector can be read while it runs (bpf-fentry's raw
    record file); with any other method every page is walked, and the events say so."""
    if rule is None or method == "bpf-fentry":
        return rule
    event(
        "stop-when-tight-off",
        f"latency.stop_when_tight needs the bpf-fentry collector, this one is {method}: "
        "every page walked",
    )
    return None
