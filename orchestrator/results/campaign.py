"""A campaign: many run directories, grouped by the spec they ran.

Runs of one spec (the same spec_sha256 in their manifests; the spec name when a manifest
has no hash) are combined into one analysis; runs of different specs are reported each
on their own and set side by side (campaign_table). Pure functions of manifests and
analyses: nothing here plots or touches the host.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.errors import UsageError
from orchestrator.manifest import load_manifest

# Per-trial metrics set side by side across specs (median over successful trials).
SIDE_BY_SIDE = {
    "saved_per_guest_mib": "saved per guest, general_profit (MiB)",
    "saved_profit_mib": "saved, general_profit (MiB)",
    "ksmd_cpu_s_per_gib": "ksmd CPU per GiB saved (s/GiB)",
    "settle_s": "time to settle (s)",
}


@dataclass(frozen=True)
class SpecGroup:
    """The runs of one spec, in the order given."""

    key: str  # spec_sha256, or "name:<spec_name>" when the manifests have no hash
    spec_name: str
    runs: tuple[Path, ...]

    @property
    def slug(self) -> str:
        """A folder name for this spec's report: <spec name>-<8 hex of the hash>."""
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", self.spec_name).lstrip(".") or "spec"
        tail = self.key[:8] if not self.key.startswith("name:") else "nohash"
        return f"{name}-{tail}"


def spec_key(manifest: dict[str, Any]) -> str:
    sha = manifest.get("spec_sha256")
    return str(sha) if sha else f"name:{manifest.get('spec_name')}"


def group_runs(run_dirs: Sequence[Path]) -> list[SpecGroup]:
    """The run directories grouped by spec, groups in order of first appearance. Every
    manifest is validated first.

    Raises UsageError (one line naming the file) for a directory that is not a run, and
    when the same directory is given twice."""
    if not run_dirs:
        raise UsageError("no run directories given to the report")
    seen: dict[Path, Path] = {}
    groups: dict[str, tuple[str, list[Path]]] = {}
    for d in run_dirs:
        real = Path(d).resolve()
        if real in seen:
            raise UsageError(f"{d}: given twice (also as {seen[real]})")
        seen[real] = Path(d)
        m = load_manifest(Path(d))
        _, runs = groups.setdefault(spec_key(m), (str(m.get("spec_name")), []))
        runs.append(Path(d))
    out = [SpecGroup(k, name, tuple(runs)) for k, (name, runs) in groups.items()]
    slugs = [g.slug for g in out]
    if len(set(slugs)) < len(slugs):  # same name and hash prefix: number them
        out = [
            SpecGroup(g.key, f"{g.spec_name}-{i + 1}", g.runs) if slugs.count(g.slug) > 1 else g
            for i, g in enumerate(out)
        ]
    return out


def campaign_table(analyses: Sequence[tuple[SpecGroup, Any]]) -> pd.DataFrame:
    """Long form, one row per spec, kernel, fleet size and metric of SIDE_BY_SIDE: the
    number of successful trials and the median over them (the metric's unit).
    analyses: (group, analysis.Analysis) pairs."""
    rows = []
    for group, a in analyses:
        ok = a.trials[a.trials["status"] == "successful"]
        for (kernel, fleet), grp in ok.groupby(["kernel", "fleet_size"], sort=True):
            for metric, label in SIDE_BY_SIDE.items():
                values = pd.to_numeric(grp[metric], errors="coerce").dropna()
                rows.append(
                    {
                        "spec": group.slug,
                        "spec_name": group.spec_name,
                        "spec_key": group.key,
                        "runs": len(group.runs),
                        "kernel": str(kernel),
                        "fleet_size": int(fleet),
                        "metric": label,
                        "trials": len(values),
                        "median": float(values.median()) if len(values) else float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def side_by_side(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: rows kernel x fleet size, one column per spec (median, n trials)."""
    out: dict[str, pd.DataFrame] = {}
    if table.empty:
        return out
    for metric, grp in table.groupby("metric", sort=False):
        cell = grp.assign(
            value=[
                "–" if pd.isna(m) else f"{m:.3g} (n={n})"
                for m, n in zip(grp["median"], grp["trials"], strict=True)
            ]
        )
        wide = cell.pivot_table(
            index=["kernel", "fleet_size"], columns="spec", values="value", aggfunc="first"
        )
        wide = wide.reindex(columns=list(dict.fromkeys(grp["spec"]))).fillna("–")
        out[str(metric)] = wide.reset_index().rename(columns={"fleet_size": "fleet size"})
    return out
