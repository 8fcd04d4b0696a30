"""The agent's one runner of external commands (mount, mkswap, swapon, ...).

Argument lists only, always with a timeout; a failure raises AgentCommandError with
the argv, the rc and the tail of stderr, so the one-line message says what ran and why
it failed.
"""

from __future__ import annotations

import subprocess

from .fs import AgentError

STDERR_TAIL_CHARS = 400


class AgentCommandError(AgentError):
    """An external command failed (rc != 0), was missing (rc 127) or timed out (rc None)."""

    def __init__(self, argv: list[str], rc: int | None, stderr_tail: str) -> None:
        self.argv = list(argv)
        self.rc = rc
        self.stderr_tail = stderr_tail
        how = "timed out" if rc is None else f"rc {rc}"
        super().__init__(f"{' '.join(argv)}: {how}: {stderr_tail or 'no stderr'}")


def tail(text: str, chars: int = STDERR_TAIL_CHARS) -> str:
    """The last `chars` characters of text, stripped (where the reason usually is)."""
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def run(argv: list[str], timeout_s: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run argv to completion (stdout and stderr captured as text) within timeout_s.

    Raises AgentCommandError when the program is missing (rc 127), runs past timeout_s
    (rc None; the child is killed) or, with check, exits non-zero."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as e:
        raise AgentCommandError(argv, 127, f"{argv[0]}: not found") from e
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise AgentCommandError(argv, None, tail(err or f"after {timeout_s:g} s")) from e
    if check and cp.returncode != 0:
        raise AgentCommandError(argv, cp.returncode, tail(cp.stderr))
    return cp
