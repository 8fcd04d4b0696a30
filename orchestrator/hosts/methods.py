"""What each kind of host can run, apart from the Host code (the spec imports it)."""

from __future__ import annotations

from typing import Literal

HostKind = Literal["local", "labvm", "inventory"]

# The trigger methods each kind of host runs (besides "auto"). A lab VM and a lab
# machine are driven through the host agent, which migrates between NUMA nodes and
# reclaims with memory.reclaim (cgroup v2); this machine can also compact, offline
# memory blocks and step cgroup-v1 limits.
METHODS: dict[HostKind, dict[str, frozenset[str]]] = {
    "local": {
        "migrate": frozenset({"numa", "compaction", "offline"}),
        "reclaim": frozenset({"memory.reclaim", "v1-limit-steps"}),
    },
    "labvm": {"migrate": frozenset({"numa"}), "reclaim": frozenset({"memory.reclaim"})},
    "inventory": {"migrate": frozenset({"numa"}), "reclaim": frozenset({"memory.reclaim"})},
}


def refusal(kind: HostKind, trigger: str, method: str) -> str | None:
    """Why host kind `kind` cannot run `method` for `trigger` (None when it can)."""
    offered = METHODS[kind][trigger]
    if method == "auto" or method in offered:
        return None
    return f"not available on host.kind {kind} (use auto or {' or '.join(sorted(offered))})"
