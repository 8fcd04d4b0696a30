"""Small file helpers shared by every part of the agent, and its error type."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

PROC = Path("/proc")
STATE_DIR = Path(os.environ.get("DENSITYLAB_STATE", "/run/densitylab"))


class AgentError(Exception):
    """A host-side read or write failed; the message names the file."""


# ---------------------------------------------------------------- small file helpers


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise AgentError(f"{path}: {e.strerror or e}") from e


def write_text(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise AgentError(f"{path}: cannot write {value!r}: {e.strerror or e}") from e


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON via a temp file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def parse_key_values(text: str, sep: str | None = None) -> dict[str, int]:
    """Parse 'key value' (or 'key: value kB') lines; non-integer values are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ", 1).split() if sep is None else line.split(sep)
        if len(parts) >= 2:
            with contextlib.suppress(ValueError):
                out[parts[0].strip()] = int(parts[1])
    return out
