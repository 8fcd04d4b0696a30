"""The fleet of a trial, as guests (libvirt domains filled through ansible-runner) or,
where a nested fleet would be too slow, as processes with the same fill pattern. The
trial's phases treat both alike: boot, wait ready, fill, verify, scramble."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

from orchestrator import fleet, integrity, pagecount, plan
from orchestrator.engine.context import RunContext
from orchestrator.engine.state import TrialResult, TrialState
from orchestrator.errors import HostError
from orchestrator.hosts.base import Host, Proc
from orchestrator.workload import FillResult, PlaybookDriver, PlayError, WorkloadDriver


class TrialFleet(Protocol):
    kind: str  # "guest" or "host-process": the walk targets' kind

    def boot(self, stack: ExitStack) -> dict[str, int]:
        """Start every member; name -> pid of the process holding its memory."""

    def wait_ready(self, timeout_s: float) -> None: ...
    def fill(self, stack: ExitStack) -> list[FillResult]: ...
    def verify(self) -> list[integrity.Verification]: ...
    def scramble(self) -> None: ...
    def load(self, timeout_s: float) -> None:
        """The workload's load during the hold, if it has one (playbook workloads)."""

    def count_pages(self, fills: list[FillResult], res: TrialResult) -> None:
        """The workload's saving page by page, where the fleet's pages can be followed
        (guests: guest pagemap -> QEMU's RAM mapping -> host pagemap)."""


def fleet_for(ctx: RunContext, host: Host, trial: plan.Trial, st: TrialState) -> TrialFleet:
    """Guests where the host runs them at full speed, processes elsewhere."""
    if host.guests:
        return GuestFleet(ctx, host, trial, st)
    return ProcessFleet(ctx, host, trial, st)


class GuestFleet:
    kind = "guest"

    def __init__(self, ctx: RunContext, host: Host, trial: plan.Trial, st: TrialState):
        self.ctx, self.host, self.trial, self.st = ctx, host, trial, st
        self.fl: fleet.Fleet | None = None
        self.driver: WorkloadDriver | None = None
        self.plays: PlaybookDriver | None = None

    def boot(self, stack: ExitStack) -> dict[str, int]:
        ctx, trial = self.ctx, self.trial
        self.fl = fl = stack.enter_context(
            fleet.Fleet(ctx.conn, ctx.store.run_id, trial.trial_id, ctx.domain_type)
        )
        token = ctx.store.run_id.rsplit("-", 1)[-1] + f"{int(time.time()) % 100000:05d}"
        fl.define(self.guest_specs(token))
        self.st.guests = list(fl.guests)  # the fleet clears its own list at teardown
        fl.start_all()
        return {g.name: g.pid for g in fl.guests if g.pid is not None}

    def guest_specs(self, token: str) -> list[fleet.GuestSpec]:
        """One spec per guest: its own overlay on the image's disk (if it has one) and,
        for our images, its own hostname on the kernel command line."""
        ctx, trial = self.ctx, self.trial
        logs = ctx.store.trial_dir(trial.trial_id) / "console"
        overlays = fleet.OVERLAY_ROOT / ctx.store.run_id
        out = []
        for i in range(trial.fleet_size):
            name = f"dl-{token}-{trial.fleet_size}-{trial.repeat}-g{i}"
            out.append(
                fleet.GuestSpec(
                    name=name,
                    memory_mib=ctx.spec.fleet.memory_mib,
                    vcpus=ctx.spec.fleet.vcpus,
                    image=self.guest_image(name),
                    console_log=logs / f"g{i}.log",
                    overlay=overlays / f"{name}.qcow2" if self.disk is not None else None,
                )
            )
        return out

    @property
    def disk(self) -> object:
        return self.ctx.boot.disk if self.ctx.boot is not None else None

    def guest_image(self, name: str) -> fleet.GuestImage:
        boot, tiny = self.ctx.boot, self.ctx.image
        if boot is None:
            return fleet.GuestImage(kernel=tiny.kernel, initrd=tiny.initrd)
        cmdline = f"{boot.cmdline} dl.hostname={name}" if boot.hostname_arg else boot.cmdline
        return fleet.GuestImage(boot.kernel, boot.initrd, boot.disk, cmdline, boot.markers)

    def wait_ready(self, timeout_s: float) -> None:
        assert self.fl is not None
        self.fl.wait_ready(timeout_s)

    def fill(self, stack: ExitStack) -> list[FillResult]:
        """Start the workload everywhere and wait for it, stopping early if the host
        runs short of memory. A playbook workload runs its play and fills nothing the
        prediction could count (its saving is measured against the idle fleet)."""
        if self.ctx.spec.workload.kind == "playbook":
            self.run_playbook("workload", self.ctx.spec.phases.fill.timeout_s)
            return []
        return self.fill_pattern(stack)

    def cancel_when_short(self, short: list[str]) -> Callable[[], bool]:
        """A cancel callback for plays: True once the host is below its memory reserve
        (the reason appended to short) or a stop was requested."""
        ctx, spec, host = self.ctx, self.ctx.spec, self.host

        def cancel() -> bool:
            samples = host.samples()
            avail_mib = (
                samples[-1]["meminfo_kib"].get("MemAvailable", 1 << 40) / 1024
                if samples
                else 1 << 30
            )
            if avail_mib < spec.host_reserve_mib and not short:
                short.append(
                    f"host memory reserve reached: MemAvailable {avail_mib:.0f} MiB < "
                    f"host_reserve_mib {spec.host_reserve_mib}"
                )
            return bool(short) or ctx.guard.requested

        return cancel

    def run_playbook(self, play: str, timeout_s: float) -> None:
        """The workload's play (`workload`) or load play (`load`) in every guest; each
        guest's result goes to the trial's plays table, also when the play fails."""
        ctx, w = self.ctx, self.ctx.spec.workload
        assert self.fl is not None and w.playbook is not None
        playbook = w.playbook if play == "workload" else w.load
        if playbook is None:
            return
        short: list[str] = []
        if self.plays is None:
            self.plays = PlaybookDriver(
                [g.name for g in self.fl.guests],
                ctx.store.trial_dir(self.trial.trial_id) / "ansible",
                self.host.libvirt_uri or fleet.URI,
                {**w.vars, "seed": ctx.spec.workload_seed},
                on_event=ctx.progress.guest_event,
                cancel=self.cancel_when_short(short),
            )
        try:
            with ctx.guard.deferred():
                self.plays.run(play, Path(playbook), timeout_s)
        except PlayError as e:
            ctx.guard.check()
            if short:
                raise HostError(short[0]) from e
            raise
        finally:
            self.st.plays = list(self.plays.results)

    def load(self, timeout_s: float) -> None:
        """The load play during the hold, within timeout_s (the hold lasts at least as
        long as the play: under TCG with ksmd busy, 40,000 redis GETs in three guests
        took longer than a minute)."""
        if self.ctx.spec.workload.kind == "playbook" and self.ctx.spec.workload.load:
            self.run_playbook("load", timeout_s)

    def fill_pattern(self, stack: ExitStack) -> list[FillResult]:
        ctx, spec, host = self.ctx, self.ctx.spec, self.host
        assert self.fl is not None
        short: list[str] = []

        cancel = self.cancel_when_short(short)
        self.driver = driver = WorkloadDriver(
            [g.name for g in self.fl.guests],
            ctx.store.trial_dir(self.trial.trial_id) / "ansible",
            host.libvirt_uri or fleet.URI,
            on_event=ctx.progress.guest_event,
            cancel=cancel,
        )
        stack.callback(driver.stop)
        seed = spec.workload_seed
        try:
            with ctx.guard.deferred():
                driver.start(spec.workload, seed, spec.phases.fill.timeout_s)
                return driver.wait_filled(spec.workload, seed, spec.phases.fill.timeout_s)
        except PlayError as e:
            ctx.guard.check()
            if short:
                raise HostError(short[0]) from e
            raise

    def verify(self) -> list[integrity.Verification]:
        # A playbook's data is the service's own; nothing here knows its pattern.
        return self.driver.verify() if self.driver is not None else []

    def scramble(self) -> None:
        assert self.driver is not None
        self.driver.scramble()

    def count_pages(self, fills: list[FillResult], res: TrialResult) -> None:
        assert self.fl is not None
        if not fills:  # a playbook workload: no dlfill region to follow
            return
        pagecount.record(self.ctx.store, self.trial.trial_id, self.fl, fills, res)


class ProcessFleet:
    """fleet.count processes with the guests' fill pattern (named pattern-<i>)."""

    kind = "host-process"

    def __init__(self, ctx: RunContext, host: Host, trial: plan.Trial, st: TrialState):
        self.ctx, self.host, self.trial, self.st = ctx, host, trial, st
        self.procs: list[Proc] = []

    def boot(self, stack: ExitStack) -> dict[str, int]:
        spec = self.ctx.spec
        self.procs = self.host.start_fleet_processes(
            spec.workload, self.trial.fleet_size, spec.workload_seed, stack
        )
        self.st.fleet_procs = self.procs
        return {p.name: p.pid for p in self.procs}

    def wait_ready(self, timeout_s: float) -> None:
        pass  # a process is ready when it runs

    def fill(self, stack: ExitStack) -> list[FillResult]:
        self.host.wait_filled(self.procs, self.ctx.spec.phases.fill.timeout_s)
        return [
            FillResult(
                p.name,
                float(p.done["fill_s"]),
                int(p.done["dup_pages"]),
                int(p.done["zero_pages"]),
                int(p.done["unique_pages"]),
                int(p.done["volatile_pages"]),
                int(p.done["vmas"]),
            )
            for p in self.procs
        ]

    def verify(self) -> list[integrity.Verification]:
        return self.host.verify(self.procs) if self.procs else []

    def load(self, timeout_s: float) -> None:
        pass  # the fill pattern has no load

    def scramble(self) -> None:
        self.host.scramble(self.procs)

    def count_pages(self, fills: list[FillResult], res: TrialResult) -> None:
        pass  # processes' own pages: the merge's total is theirs (no boot leftovers)
