"""Typed exceptions. Each carries the fields a caller needs and renders a useful message.

Only the CLI turns these into exit codes: UsageError (bad input) -> 2, others -> 1.
"""

from __future__ import annotations

from collections.abc import Sequence


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


class HostBusy(UsageError):
    """Another densitylab run (or a clean of this run) holds the host; nothing was touched.

    A usage error (exit 2): the request conflicts with what is running, so waiting or
    stopping the other run is up to the user."""

    def __init__(self, run_id: str, holder: str, why: str):
        self.run_id = run_id
        self.holder = holder
        super().__init__(f"{why}: {holder}")
