"""Waiting on a host's samples: until KSM settles, or for a hold."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from orchestrator.engine.state import SettleResult
from orchestrator.hosts.base import Host
from orchestrator.interrupts import InterruptGuard
from orchestrator.sampling import settled, sharing_pages
from orchestrator.spec import Spec


def new_samples(
    host: Host, guard: InterruptGuard, timeout_s: float
) -> Iterator[list[dict[str, Any]]]:
    """Batches of samples the host's sampler writes from now on (often empty), until
    timeout_s; checks for a stop request between polls."""
    start = time.monotonic()
    n_read = len(host.samples())
    while time.monotonic() - start <= timeout_s:
        guard.check()
        fresh = host.samples()[n_read:]
        n_read += len(fresh)
        yield fresh
        time.sleep(host.poll_s)


def wait_settled(
    host: Host,
    guard: InterruptGuard,
    spec: Spec,
    timeout_s: float,
    on_sample: Callable[[dict[str, Any]], None],
    expect_sharing: bool = False,
) -> SettleResult:
    """Wait until KSM sharing moves less than settle_pct over settle_scans full scans.

    Compares the newest sample with the newest one taken at least settle_scans full
    scans earlier, both inside this wait, so a settle always reflects memory as it is
    now, however many scans fit between two samples. With expect_sharing, no sharing
    at all is not settled (ksmd may not have merged a page yet). Returns whether it
    settled or the timeout ended it.
    """
    m = spec.phases.merge
    start = time.monotonic()
    seen: list[tuple[int, int]] = []  # (full_scans, sharing pages) of samples in this wait
    last: dict[str, Any] = {}
    for fresh in new_samples(host, guard, timeout_s):
        for s in fresh:
            last = s
            on_sample(s)
            seen.append((int(s["ksm"].get("full_scans", 0)), sharing_pages(s)))
        sharing = bool(seen) and (seen[-1][1] > 0 or not expect_sharing)
        if sharing and settled(seen, m.settle_scans, m.settle_pct):
            return SettleResult(True, time.monotonic() - start, last)
    return SettleResult(False, time.monotonic() - start, last)


def hold(guard: InterruptGuard, seconds: float) -> None:
    """Let the host run undisturbed (its sampler keeps sampling), stopping on request."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        guard.check()
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
