"""KSM: the knobs under /sys/kernel/mm/ksm (saved, applied, restored) and its counters."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from .fs import AgentError, read_text, write_json_atomic, write_text

KSM_DIR = Path("/sys/kernel/mm/ksm")

KSM_COUNTERS = (
    "full_scans",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "general_profit",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
)
# Knobs the kernel refuses to change (EBUSY) while KSM pages exist; `run=2` unmerges first.
KNOBS_NEEDING_UNMERGE = ("merge_across_nodes", "max_page_sharing")


def ksm_knob_names(ksm_dir: Path = KSM_DIR) -> list[str]:
    """The writable knobs of this kernel's KSM (they differ between kernel versions)."""
    if not ksm_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in ksm_dir.iterdir()
        if p.is_file() and p.name not in KSM_COUNTERS and os.access(p, os.W_OK)
    )


def knob_value(text: str) -> str:
    """A knob's current value; choice knobs read as `[none] scan-time` mean `none`."""
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else text.strip()


def read_ksm_knobs(ksm_dir: Path = KSM_DIR) -> dict[str, str]:
    return {name: knob_value(read_text(ksm_dir / name)) for name in ksm_knob_names(ksm_dir)}


def read_ksm_counters(ksm_dir: Path = KSM_DIR) -> dict[str, int]:
    """KSM counters present on this kernel; absent ones are left out, not zeroed."""
    out: dict[str, int] = {}
    for name in KSM_COUNTERS:
        path = ksm_dir / name
        if path.exists():
            out[name] = int(read_text(path).split()[0])
    return out


def write_knob(ksm_dir: Path, name: str, value: str) -> None:
    """Write one knob; on EBUSY for knobs that need it, unmerge (run=2) and retry."""
    try:
        write_text(ksm_dir / name, value)
    except AgentError:
        if name not in KNOBS_NEEDING_UNMERGE:
            raise
        write_text(ksm_dir / "run", "2")
        write_text(ksm_dir / name, value)


def prune_stale_stable_tree(ksm_dir: Path = KSM_DIR) -> bool:
    """With ksmd stopped and nothing merged, drop whatever KSM still keeps of merges gone
    by (run=2, then back to 0); True when it did. Measured on this 6.18 host: a trial's
    teardown stopping ksmd (run=0) left `stable_node_chains` at 1 with `pages_shared` 0,
    and the next trial's guests merged only 7-19 of their 24 identical MiB however long
    they held; after run=2 they merged all 24. Not every such leftover shows in a counter,
    so this does not wait for one. With pages_shared 0 no page of anyone's is merged, so
    unmerging changes no process's memory."""
    if knob_value(read_text(ksm_dir / "run")) != "0":
        return False  # a running ksmd prunes its chains itself; run=2 is ksmd's own state
    if read_ksm_counters(ksm_dir).get("pages_shared", 0) != 0:
        return False
    write_text(ksm_dir / "run", "2")
    write_text(ksm_dir / "run", "0")
    return True


def ordered_for_write(settings: Mapping[str, str]) -> list[tuple[str, str]]:
    """`run` goes last so ksmd starts only once every other knob is in place."""
    return sorted(settings.items(), key=lambda kv: (kv[0] == "run", kv[0]))


def apply_ksm(
    settings: Mapping[str, int | str], saved_path: Path, ksm_dir: Path = KSM_DIR
) -> dict[str, str]:
    """Save the current values of the named knobs to saved_path, then apply settings.

    The saved file is written before anything changes, so `restore_ksm` (or a later
    `densitylab clean` after kill -9) can always put the host back. A saved file that
    exists already is never overwritten, only completed: its values are the host's
    original ones. Returns the saved values. Raises AgentError naming the knob on an
    unknown or unwritable knob.
    """
    known = set(ksm_knob_names(ksm_dir))
    unknown = sorted(set(settings) - known)
    if unknown:
        raise AgentError(f"{ksm_dir}: no writable KSM knob {', '.join(unknown)} on this kernel")
    current = read_ksm_knobs(ksm_dir)
    saved = {k: current[k] for k in settings}
    saved.setdefault("run", current.get("run", "0"))
    if saved_path.exists():
        # The file already holds the host's own values, saved before some run's settings
        # took effect (that run maybe killed with SIGKILL): the knobs in force now are that
        # run's, not the host's. Keep every saved value; add only knobs it lacks.
        saved = {**saved, **json.loads(read_text(saved_path))["knobs"]}
    write_json_atomic(saved_path, {"ksm_dir": str(ksm_dir), "knobs": saved})
    prune_stale_stable_tree(ksm_dir)
    for name, value in ordered_for_write({k: str(v) for k, v in settings.items()}):
        write_knob(ksm_dir, name, value)
    return saved


def restore_ksm(saved_path: Path) -> list[str]:
    """Restore knobs from a saved file, keep going past failures, return the errors.

    The file is removed only when every knob was restored.
    """
    data = json.loads(read_text(saved_path))
    ksm_dir = Path(data["ksm_dir"])
    errors: list[str] = []
    for name, value in ordered_for_write(data["knobs"]):
        try:
            write_knob(ksm_dir, name, value)
        except AgentError as e:
            errors.append(str(e))
    if not errors:
        try:
            prune_stale_stable_tree(ksm_dir)
        except AgentError as e:
            errors.append(str(e))
    if not errors:
        saved_path.unlink(missing_ok=True)
    return errors
