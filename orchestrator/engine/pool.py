"""Trials spread over many machines: one trial per machine at a time, each machine
running every kernel about equally often (so that no kernel is confounded with one
machine), a machine that fails or vanishes drained and its trial rerun on another."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchestrator import plan
from orchestrator.engine.state import TrialResult
from orchestrator.errors import DensitylabError, Interrupted
from orchestrator.hosts.inventory import InventoryHost
from orchestrator.interrupts import InterruptGuard

log = logging.getLogger(__name__)

RunOne = Callable[[InventoryHost, plan.Trial], TrialResult]
Drained = Callable[[plan.Trial, TrialResult], None]  # a failed attempt to be rerun
EventFn = Callable[[str, str], None]  # (event, detail): the run's events


@dataclass
class TrialQueue:
    """Pending trials in plan order (kernels interleaved), shared by the machines'
    threads. A machine finding nothing pending waits while others still run trials:
    a drained machine's trial comes back to the queue."""

    pending: list[plan.Trial]
    in_flight: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def take(self, host: InventoryHost, guard: InterruptGuard) -> plan.Trial | None:
        """The first pending trial of the kernel this machine has run least, of the
        kernel it runs now on a tie (a switch saved); None when every trial is taken
        and finished, or a stop was requested."""
        with self.cond:
            while not self.pending and self.in_flight and not guard.requested:
                self.cond.wait(timeout=0.5)
            if not self.pending or guard.requested:
                return None
            best = min(
                self.pending,
                key=lambda t: (host.kernels_run.get(t.kernel, 0), not host.runs_now(t.kernel)),
            )
            self.pending.remove(best)
            self.in_flight += 1
            return best

    def done(self, trial: plan.Trial, again: bool = False) -> None:
        """A taken trial finished (again: it goes back to the front, to be rerun)."""
        with self.cond:
            self.in_flight -= 1
            if again:
                self.pending.insert(0, trial)
            self.cond.notify_all()


def worker(
    host: InventoryHost,
    queue: TrialQueue,
    run_one: RunOne,
    on_drained: Drained,
    event: EventFn,
    guard: InterruptGuard,
) -> None:
    """Run trials on one machine until none are left, the machine is lost, or a stop is
    requested."""
    while (trial := queue.take(host, guard)) is not None:
        try:
            res = run_one(host, trial)
        except Interrupted:
            queue.done(trial)
            return
        except BaseException:
            queue.done(trial)
            raise
        lost = res.status == "failed" and not host.alive()
        if lost:
            on_drained(trial, res)
        queue.done(trial, again=lost)
        if lost:
            event(
                "machine-drained",
                f"{host.machine.name}: {trial.trial_id} failed ({res.reason}) and the machine "
                "no longer answers: the trial is rerun on another machine",
            )
            return


def run_on_machines(
    hosts: Sequence[InventoryHost],
    trials: list[plan.Trial],
    run_one: RunOne,
    on_drained: Drained,
    event: EventFn,
    guard: InterruptGuard,
) -> list[plan.Trial]:
    """Run every trial somewhere; returns the trials no machine was left to run. The
    caller's thread waits (and takes signals: workers see the stop request and tear
    down their trials); Interrupted is raised again once every worker has stopped."""
    queue = TrialQueue(list(trials))
    threads = [
        threading.Thread(
            target=worker,
            args=(h, queue, run_one, on_drained, event, guard),
            name=f"machine-{h.machine.name}",
        )
        for h in hosts
    ]
    for th in threads:
        th.start()
    stop: Interrupted | None = None
    while any(th.is_alive() for th in threads):
        try:
            for th in threads:
                th.join(timeout=0.5)
        except Interrupted as e:  # the workers stop at their next check
            stop = stop or e
    for h in hosts:
        try:
            for note in h.close():
                event("machine-restored", note)
        except DensitylabError as e:
            event("machine-not-restored", f"{h.machine.name}: {e}")
    if stop is not None or guard.requested:
        raise stop or Interrupted(guard.signum or 2)
    left = queue.pending
    if left:
        event("no-machine-left", f"{len(left)} trials not run: every machine was drained")
    return left
