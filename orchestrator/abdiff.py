"""A/B hygiene for kernels built from source: what separates the two, stated.

At run time source_pair_diff() records, on the second kernel of a pair, what differs
from the first (`differs_from` in the manifest's kernel record): the patches added and
removed, whether the trees and configs are the same and, when the configs differ, the
options that differ (read from the kbuild cache's `.config` of each build). The report
renders it with report_lines(): one sentence per pair, and a warning for anything
besides the patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_DIFF_LIMIT = 40  # options listed in the manifest; the count is always exact


def config_of(record: dict[str, Any], cache: Path | None = None) -> dict[str, str] | None:
    """The built kernel's .config as option -> value (None: not in the kbuild cache)."""
    from orchestrator import kbuild, kernels

    key = record.get("build_key")
    if not key:
        return None
    path = (cache or kbuild.cache_root()) / "builds" / str(key) / "config"
    if not path.is_file():
        return None
    return kernels.parse_kconfig(path.read_text())


def config_diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """`CONFIG_X: a -> b` for every option whose value differs (`n` when unset)."""
    return [
        f"{k}: {a.get(k, 'n')} -> {b.get(k, 'n')}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "n") != b.get(k, "n")
    ]


def source_pair_diff(
    a: dict[str, Any], b: dict[str, Any], cache: Path | None = None
) -> dict[str, Any]:
    """What separates two kernels built from source (their manifest records)."""
    pa = {p["sha256"]: p["name"] for p in a.get("patches", [])}
    pb = {p["sha256"]: p["name"] for p in b.get("patches", [])}
    out: dict[str, Any] = {
        "kernel": a["name"],
        "patches_added": [n for h, n in pb.items() if h not in pa],
        "patches_removed": [n for h, n in pa.items() if h not in pb],
        "same_tree": a["tree_sha256"] == b["tree_sha256"],
        "same_config": a["config_sha256"] == b["config_sha256"],
    }
    if not out["same_config"]:
        ca, cb = config_of(a, cache), config_of(b, cache)
        if ca is not None and cb is not None:
            diff = config_diff(ca, cb)
            out["config_options_differing"] = len(diff)
            out["config_diff"] = diff[:CONFIG_DIFF_LIMIT]
    return out


def pair_lines(name: str, d: dict[str, Any]) -> tuple[str, list[str]]:
    """(the sentence, warnings) for one kernel's differs_from."""
    base = d.get("kernel", "?")
    changes = []
    if d.get("patches_added"):
        changes.append("patches " + ", ".join(d["patches_added"]))
    if d.get("patches_removed"):
        changes.append("without patches " + ", ".join(d["patches_removed"]))
    what = "; ".join(changes) or "no patch"
    tree = "same source tree" if d.get("same_tree") else "a different source tree"
    config = "same config" if d.get("same_config") else "configs differ"
    sentence = f"{name} differs from {base} by: {what} ({tree}, {config})."
    warnings = []
    if not d.get("same_tree"):
        warnings.append(f"{name} vs {base}: the source trees differ beyond the patches")
    if not d.get("same_config"):
        n = d.get("config_options_differing")
        shown = d.get("config_diff") or []
        detail = f" in {n} option(s): {', '.join(shown)}" if n is not None else ""
        more = f" (first {len(shown)} listed)" if n is not None and n > len(shown) else ""
        warnings.append(f"{name} vs {base}: configs differ{detail}{more}")
    if not changes:
        warnings.append(f"{name} vs {base}: no patch separates them")
    return sentence, warnings


def report_lines(manifests: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(what differs, warnings) for every source-built pair in the runs' manifests."""
    lines: list[str] = []
    warnings: list[str] = []
    for m in manifests:
        for k in m.get("kernels") or []:
            d = k.get("differs_from")
            if isinstance(d, dict):
                sentence, warns = pair_lines(str(k.get("name")), d)
                if sentence not in lines:
                    lines.append(sentence)
                warnings += [w for w in warns if w not in warnings]
    return lines, warnings
