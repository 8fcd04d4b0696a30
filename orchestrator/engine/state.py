"""What a trial reports (TrialResult: one row of trials.parquet) and accumulates while
it runs (TrialState), on whatever host it runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from orchestrator import fleet, integrity
from orchestrator.attribution import Window
from orchestrator.hosts.base import Proc
from orchestrator.sampling import PhaseMark
from orchestrator.workload import FillResult, PlayResult

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What the engine tells a front end (the CLI draws it with rich; tests ignore it)."""

    def phase(self, trial_id: str, phase: str) -> None: ...
    def guest_event(self, guest: str, event: str) -> None: ...
    def merge(self, sharing_mib: float, target_mib: float | None, full_scans: int) -> None: ...


class QuietProgress:
    def phase(self, trial_id: str, phase: str) -> None:
        log.info("%s: %s", trial_id, phase)

    def guest_event(self, guest: str, event: str) -> None:
        pass

    def merge(self, sharing_mib: float, target_mib: float | None, full_scans: int) -> None:
        pass


@dataclass
class TrialResult:
    """One row of trials.parquet."""

    trial_id: str
    kernel: str
    kernel_release: str
    fleet_size: int
    repeat: int
    accel: str
    guest_memory_mib: int
    workload_mib: int
    status: str = "failed"
    reason: str | None = None
    host: str = ""  # where it ran: this machine, a lab VM, machine NAME
    ksm_setting: str | None = None  # the swept knobs' values (plan.Trial.ksm_setting)
    settled: bool = False
    settle_s: float | None = None
    baseline_settled: bool | None = None
    baseline_saving_mib: float = 0.0
    predicted_saving_mib: float | None = None
    total_saving_mib: float | None = None
    residual_saving_mib: float | None = None
    pre_scramble_saving_mib: float | None = None  # sharing just before the scramble
    attributed: bool = False
    measured_saving_mib: float | None = None
    pagecount_saving_mib: float | None = None  # orchestrator.pagecount, after the merge
    saving_method: str | None = None  # "pagemap" when pagecount_saving_mib is measured
    general_profit_mib: float | None = None
    pages_sharing: int | None = None
    pages_shared: int | None = None
    ksmd_cpu_s: float | None = None
    latency_method: str | None = None
    latency_notes: str | None = None
    walks: int | None = None
    mappings_per_ksm_page: float | None = None  # measured at the end of the merge
    started_ns: int = 0
    ended_ns: int = 0


@dataclass
class SettleResult:
    settled: bool
    seconds: float
    sample: dict[str, Any]


@dataclass
class TrialState:
    """What a trial accumulates while it runs, turned into tables at the end. Every
    timestamp is on the trial host's CLOCK_MONOTONIC (`clock`)."""

    clock: Callable[[], int] = time.monotonic_ns
    t0_ns: int = 0
    marks: list[PhaseMark] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    fills: list[FillResult] = field(default_factory=list)
    plays: list[PlayResult] = field(default_factory=list)  # a playbook workload's, per guest
    guests: list[fleet.Guest] = field(default_factory=list)  # a guest fleet's domains
    fleet_procs: list[Proc] = field(default_factory=list)  # a process fleet's processes
    host_procs: list[Proc] = field(default_factory=list)  # the fragmented host copies
    samples: list[dict[str, Any]] = field(default_factory=list)
    collected: bool = False  # a latency collector ran
    latency: pd.DataFrame | None = None  # its walks, as the host recorded them
    windows: list[Window] = field(default_factory=list)  # one workload acted on at a time
    ksm_knobs: dict[str, str] = field(default_factory=dict)  # as in force during the merge
    ksm_requested: dict[str, str] = field(default_factory=dict)  # as the trial applies them
    ksm_swept: tuple[str, ...] = ()
    guest_pattern: str = "distinct"
    integrity: integrity.IntegrityLog = field(default_factory=integrity.IntegrityLog)

    def __post_init__(self) -> None:
        self.t0_ns = self.t0_ns or self.clock()
        self.integrity.clock = self.clock

    def event(self, phase: str, event: str, detail: str = "", ts_ns: int | None = None) -> None:
        ts = self.clock() if ts_ns is None else ts_ns
        self.events.append(
            {
                "ts_ns": ts,
                "t_s": (ts - self.t0_ns) / 1e9,
                "phase": phase,
                "event": event,
                "detail": detail,
            }
        )
