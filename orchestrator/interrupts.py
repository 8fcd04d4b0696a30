"""SIGINT and SIGTERM become an Interrupted exception, so that teardown always runs.

The first signal raises (unless inside `deferred()`, where it is only recorded and
checked by the code that can stop cleanly, such as an Ansible play's cancel callback).
Later signals are recorded and ignored: teardown must not itself be interrupted.

The request is sticky: `check()` raises again outside `deferred()` however often it is
called. A raise from the handler can be lost: one that lands in a file's close (a write
the kernel interrupted with EINTR) comes out as an OSError, which callers may handle.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import Any

from orchestrator.errors import Interrupted

log = logging.getLogger(__name__)


class InterruptGuard:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._defer = 0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            log.warning("signal %d again: still tearing down, please wait", signum)
            return
        self.signum = signum
        if self._defer == 0:
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise Interrupted if a signal arrived (outside `deferred()`: teardown runs
        deferred and must finish)."""
        if self.signum is not None and self._defer == 0:
            raise Interrupted(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1

    @contextmanager
    def installed(self) -> Iterator[InterruptGuard]:
        """Install the handlers for the block; the previous handlers come back after."""
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class TeardownStack(ExitStack):
    """An ExitStack whose unwinding a signal cannot cut short (it is only recorded)."""

    def __init__(self, guard: InterruptGuard):
        super().__init__()
        self.guard = guard

    def __exit__(self, *exc: Any) -> bool:
        with self.guard.deferred():
            return bool(super().__exit__(*exc))
