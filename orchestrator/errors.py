"""Typed exceptions. Each carries the fields a caller needs and renders a useful message.

Only the CLI turns these into exit codes: UsageError (bad input) -> 2, others -> 1.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

# How much of a user's value an error message echoes: enough to recognise it, never a
# megabyte of it on one line.
SHOWN_CHARS = 60


def printable(text: str) -> str:
    """text with every control or format character escaped (newline as \\n, ESC as
    \\x1b, U+202E as \\u202e): what the user gave can neither break the one-line error
    nor drive the terminal. Idempotent: escaped text is printable."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    if c in "\n\r\t":
        return repr(c)[1:-1]
    n = ord(c)
    if unicodedata.category(c) == "Zs":  # a plain (if exotic) space
        return " "
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """text cut to about `limit` characters, marked where it was cut."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A user's value as an error message echoes it: repr, escaped, shortened."""
    if isinstance(value, str) and len(value) > 4 * limit:
        value = value[: 4 * limit]  # repr of a huge string is not worth making
    return shorten(printable(repr(value)), limit)


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
