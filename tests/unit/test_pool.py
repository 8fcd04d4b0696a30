"""The trial queue that spreads trials over an inventory's machines."""

from __future__ import annotations

import threading

from orchestrator.engine.pool import TrialQueue
from orchestrator.interrupts import InterruptGuard
from orchestrator.plan import Trial


class Machine:
    """What the queue reads of a machine: how often it ran each kernel, which it runs."""

    def __init__(self, on: str | None = None) -> None:
        self.kernels_run: dict[str, int] = {}
        self.on = on

    def runs_now(self, label: str) -> bool:
        return label == self.on


def trials(n: int) -> list[Trial]:
    return [Trial(f"{k}-n1-r{r}", k, 1, r) for r in range(n) for k in ("6.12", "7.3")]


def take_and_run(q: TrialQueue, m: Machine, guard: InterruptGuard) -> Trial | None:
    t = q.take(m, guard)  # type: ignore[arg-type]
    if t is not None:
        m.kernels_run[t.kernel] = m.kernels_run.get(t.kernel, 0) + 1
        m.on = t.kernel
        q.done(t)
    return t


def test_each_machine_runs_every_kernel() -> None:
    """Two machines taking turns: neither runs only one kernel (a kernel confounded with
    a machine would pass for a kernel effect)."""
    q, guard = TrialQueue(trials(2)), InterruptGuard()
    a, b = Machine(), Machine()
    order = [take_and_run(q, m, guard) for m in (a, b, a, b)]
    assert all(order) and take_and_run(q, a, guard) is None
    assert a.kernels_run == {"6.12": 1, "7.3": 1} == b.kernels_run


def test_a_machine_starts_on_the_kernel_it_runs() -> None:
    """Balance first; on a tie the kernel the machine is on: each machine switches once
    (two lab VMs booted on 7.3 and 6.12 used to switch three times for four trials)."""
    q, guard = TrialQueue(trials(2)), InterruptGuard()
    a, b = Machine(on="7.3"), Machine(on="6.12")
    switches = 0
    for m in (a, b, a, b):
        was = m.on
        t = take_and_run(q, m, guard)
        assert t is not None
        switches += t.kernel != was
    assert switches == 2
    assert a.kernels_run == {"6.12": 1, "7.3": 1} == b.kernels_run


def test_a_drained_trial_waits_for_a_free_machine() -> None:
    """A machine finding the queue empty waits while another still runs a trial, and
    takes that trial when it comes back (its machine drained)."""
    q, guard = TrialQueue(trials(1)[:1]), InterruptGuard()
    a, b = Machine(), Machine()
    first = q.take(a, guard)  # type: ignore[arg-type]
    assert first is not None
    got: list[Trial | None] = []
    waiter = threading.Thread(target=lambda: got.append(q.take(b, guard)))  # type: ignore[arg-type]
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive(), "b must wait: a's trial may come back"
    q.done(first, again=True)  # a is lost: its trial goes back to the queue
    waiter.join(timeout=5)
    assert got == [first]
    q.done(first)
    assert q.take(a, guard) is None  # type: ignore[arg-type]
