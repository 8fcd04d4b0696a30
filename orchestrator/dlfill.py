"""dlfill's done line, parsed in one place for its three readers: the guests' status play
(workload), host copies started here (triggers) and inside a lab host (labrun).

dlfill (images/workload/dlfill.c) prints `DLFILL DONE {json}` once its region is filled
and, when asked, merged-ready; the object holds the page counts, the VMA count and the
fill time.
"""

from __future__ import annotations

import json
from typing import Any

DONE_PREFIX = "DLFILL DONE "


def done_record(text: str) -> dict[str, Any] | None:
    """The object of the first done line in text (dlfill's stdout, a console log or one
    line); None when there is none yet. Raises ValueError on a done line whose JSON is
    not an object."""
    for line in text.splitlines():
        if line.startswith(DONE_PREFIX):
            record = json.loads(line.removeprefix(DONE_PREFIX))
            if not isinstance(record, dict):
                raise ValueError(f"{DONE_PREFIX.strip()}: expected a JSON object: {line[:200]}")
            return record
    return None
