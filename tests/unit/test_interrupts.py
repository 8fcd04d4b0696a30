"""The interrupt guard: a signal request stays raised until the run has stopped."""

from __future__ import annotations

import contextlib
import signal

import pytest

from orchestrator.errors import Interrupted
from orchestrator.interrupts import InterruptGuard


def test_handler_raises_outside_deferred() -> None:
    g = InterruptGuard()
    with pytest.raises(Interrupted):
        g._handler(signal.SIGINT, None)
    assert g.requested


def test_deferred_records_and_check_raises_after() -> None:
    g = InterruptGuard()
    with g.deferred():
        g._handler(signal.SIGTERM, None)  # only recorded
        g.check()  # teardown-like code inside deferred is not cut short
    with pytest.raises(Interrupted) as e:
        g.check()
    assert e.value.signum == signal.SIGTERM


def test_a_lost_raise_is_raised_again_by_check() -> None:
    """A raise inside a file close can surface as an OSError that a caller handles."""
    g = InterruptGuard()
    with contextlib.suppress(Interrupted):  # swallowed, as a retry loop around a write
        g._handler(signal.SIGINT, None)
    for _ in range(2):
        with pytest.raises(Interrupted):
            g.check()


def test_second_signal_is_ignored() -> None:
    g = InterruptGuard()
    with g.deferred():
        g._handler(signal.SIGINT, None)
        g._handler(signal.SIGTERM, None)
    assert g.signum == signal.SIGINT


def test_no_signal_no_raise() -> None:
    InterruptGuard().check()
