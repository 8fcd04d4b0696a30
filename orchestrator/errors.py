"""Typed exceptions. Each carries the fields a caller needs and renders a useful message.

Only the CLI turns these into exit codes: UsageError (bad input) -> 2, others -> 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class DensitylabError(Exception):
    """Base class for every error densitylab raises on purpose."""


class UsageError(DensitylabError):
    """Bad input from the user (spec, arguments, files). The CLI exits 2 with one line."""


class CommandError(DensitylabError):
    """An external command failed or timed out."""

    def __init__(
        self, argv: Sequence[str], rc: int | None, stderr_tail: str, timed_out: bool = False
    ):
        self.argv = list(argv)
        self.rc = rc
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited {rc}"
        tail = f": {stderr_tail.strip()}" if stderr_tail.strip() else ""
        super().__init__(f"{' '.join(self.argv)} {what}{tail}")


class GuestError(DensitylabError):
    """A guest could not be defined, started or reached."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"guest {name}: {reason}")


class HostError(DensitylabError):
    """The host cannot do what the experiment needs (missing capability, short of memory)."""


class Interrupted(DensitylabError):
    """SIGINT or SIGTERM arrived; raised so that teardown runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")


class IntegrityError(DensitylabError):
    """Workload pages did not hold what their pattern says after a step (a merge,
    migration or swap-in gave a process the wrong content). Fails the trial loudly."""

    def __init__(
        self, phase: str, step: int, corrupted: Mapping[str, tuple[int, int, Sequence[int]]]
    ):
        self.phase = phase
        self.step = step
        # workload -> (mismatched pages, pages checked, first mismatched page indices)
        self.corrupted = {w: (m, n, tuple(first)) for w, (m, n, first) in corrupted.items()}
        detail = "; ".join(
            f"{w}: {m} of {n} pages corrupted (pages {', '.join(map(str, first))}"
            f"{', ...' if m > len(first) else ''})"
            for w, (m, n, first) in sorted(self.corrupted.items())
        )
        super().__init__(f"integrity check after {phase} {step}: {detail}")
