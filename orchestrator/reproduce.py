"""`densitylab reproduce RUN`: run a recorded experiment again, here, and compare.

A run's manifest holds the spec as parsed (a mapping), the spec file's sha256, the seeds
the spec resolved to, and the versions of what ran (densitylab's commit, the host kernel,
QEMU, libvirt, the guest and lab images, the kernels under test). Reproducing means: the
same spec with the same seeds, on whatever this host has now, with every version that
differs named before the run starts (any of them can move the numbers), and the two runs
compared at the end.

The spec file is the recorded one when it is still there byte for byte (its sha256
matches, so `compare` sees the same spec); otherwise it is rebuilt from the manifest's
mapping (same content, other bytes: comments and layout are not recorded) and saved in
the new run directory.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UsageError, printable
from orchestrator.manifest import load_manifest
from orchestrator.spec import Spec, load_spec_text

REPRODUCED_SPEC = "reproduced-spec.yaml"
# The metrics that say how much KSM saved (analysis.TRIAL_METRICS keys).
SAVING_METRICS = ("saved_profit_mib", "saved_sharing_mib", "measured_saving_mib")


@dataclass(frozen=True)
class Reproduction:
    """What to run again: the recorded run, the spec (file and model) and the warnings."""

    run_dir: Path
    manifest: dict[str, Any]
    spec: Spec
    spec_text: str
    spec_source: str  # "recorded file <path>" or "rebuilt from the manifest"
    recorded_file: Path | None  # the recorded spec file when its bytes match


def versions_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every version a manifest records, by the label a warning names it with."""
    images = manifest.get("images") or {}
    tiny, lab = images.get("tiny") or {}, images.get("labhost") or {}
    out = {
        "densitylab commit": manifest.get("git_commit"),
        "host kernel": manifest.get("kernel_release"),
        "QEMU": manifest.get("qemu_version"),
        "libvirt": manifest.get("libvirt_version"),
        "guest image kernel sha256": tiny.get("kernel_sha256"),
        "guest image initrd sha256": tiny.get("initrd_sha256"),
    }
    if lab:
        out["lab image key"] = lab.get("key")
    for k in manifest.get("kernels") or []:
        out[f"kernel {k.get('name')} release"] = k.get("release")
        if k.get("config_sha256") is not None:
            out[f"kernel {k.get('name')} config sha256"] = k.get("config_sha256")
        if k.get("tree_sha256") is not None:
            out[f"kernel {k.get('name')} source tree sha256"] = k.get("tree_sha256")
    return out


def drift_warnings(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """One line per version the run recorded that differs here (or cannot be checked)."""
    out = []
    for what, then in recorded.items():
        now = here.get(what)
        if then is None:
            out.append(f"{what}: not recorded in the run; cannot tell whether it differs")
        elif now is None:
            out.append(f"{what}: run had {then}, not found here")
        elif str(then) != str(now):
            out.append(f"{what}: run had {then}, here {now}")
    return out


def versions_here(spec: Spec) -> dict[str, Any]:
    """The versions a run of spec would record here, found the way the runner finds
    them (so a difference is one the new run's manifest will show too)."""
    from orchestrator import doctor, images, runner, store

    lib = doctor.probe_libvirt()
    kernels, _ = runner.kernel_records(spec)
    return versions_of(
        {
            "git_commit": store.git_commit(runner.REPO),
            "kernel_release": os.uname().release,
            "qemu_version": lib.get("qemu"),
            "libvirt_version": lib.get("libvirt"),
            "images": {
                "tiny": runner.describe_image(images.find_tiny_image()),
                **runner.lab_image_record(spec),
            },
            "kernels": kernels,
        }
    )


def seeded_spec(manifest: dict[str, Any], source: str) -> dict[str, Any]:
    """The manifest's spec mapping with its recorded seeds written in, so a default
    that changed since does not change them."""
    raw = manifest.get("spec")
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: spec: not recorded; this run cannot be reproduced")
    raw = copy.deepcopy(raw)
    if manifest.get("seed") is not None:
        raw.setdefault("seed", manifest["seed"])
    ws = manifest.get("workload_seed")
    if ws is not None and ws != raw.get("seed"):
        workload = raw.setdefault("workload", {})
        if isinstance(workload, dict):  # anything else is refused by the spec's model
            workload.setdefault("seed", ws)
    return raw


def seed_mismatch(spec: Spec, manifest: dict[str, Any]) -> str | None:
    """Which recorded seed spec does not resolve to here, as a message; None when all do."""
    for field_name, value in (
        ("seed", spec.seed),
        ("workload_seed", spec.workload_seed),
        ("host_workload_seed", spec.host_workload_seed),
    ):
        then = manifest.get(field_name)
        if then is not None and then != value:
            return f"{field_name}: the run used {then}, its spec gives {value} here"
    return None


def recorded_spec_file(manifest: dict[str, Any]) -> Path | None:
    """The spec file the run was started from, when it is still there unchanged."""
    path, sha = manifest.get("spec_path"), manifest.get("spec_sha256")
    if not isinstance(path, str) or not sha:
        return None
    p = Path(path)
    try:
        return p if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha else None
    except OSError:
        return None


def plan_reproduction(run_dir: Path) -> Reproduction:
    """Read and check everything before the host is touched. Raises UsageError (one
    line, naming the manifest and field) when the run cannot be reproduced."""
    manifest = load_manifest(run_dir)
    source = printable(str(run_dir / "manifest.json"))
    recorded = recorded_spec_file(manifest)
    if recorded is not None:
        text = recorded.read_text(encoding="utf-8")
        spec, _ = load_spec_text(text, str(recorded))
        # A default seed that changed since makes the file resolve other seeds: then
        # the recorded seeds are written into a rebuilt spec, below.
        if seed_mismatch(spec, manifest) is None:
            how = f"recorded file {recorded}"
            return Reproduction(run_dir, manifest, spec, text, how, recorded)
    raw = seeded_spec(manifest, source)
    text = f"# densitylab reproduce: the spec of run {manifest['run_id']}\n" + yaml.safe_dump(
        raw, sort_keys=False, allow_unicode=True
    )
    spec, _ = load_spec_text(text, f"{source}: spec")
    if (why := seed_mismatch(spec, manifest)) is not None:
        raise UsageError(
            f"{source}: {why} (this densitylab derives seeds differently; "
            "the run cannot be reproduced)"
        )
    how = "rebuilt from the manifest (the same mapping; not the recorded file's bytes)"
    return Reproduction(run_dir, manifest, spec, text, how, None)


@contextmanager
def spec_file(rep: Reproduction) -> Iterator[Path]:
    """The spec to hand to the runner: the recorded file, or the rebuilt text in a
    temporary folder (removed afterwards; the text is kept in the new run directory)."""
    if rep.recorded_file is not None:
        yield rep.recorded_file
        return
    with tempfile.TemporaryDirectory(prefix="densitylab-reproduce-") as d:
        path = Path(d) / f"{rep.spec.name}.yaml"
        path.write_text(rep.spec_text, encoding="utf-8")
        yield path


def mark_reproduction(rep: Reproduction, new_run: Path, spec_path: Path) -> None:
    """Record in the new run's manifest which run it reproduces (and keep a rebuilt
    spec beside it: its temporary file is gone)."""
    from orchestrator import store

    st = store.RunStore.open(new_run)
    manifest = st.read_manifest()
    if rep.recorded_file is None:
        kept = new_run / REPRODUCED_SPEC
        with store.atomic_path(kept) as tmp:
            shutil.copyfile(spec_path, tmp)
        manifest["spec_path"] = str(kept)
    manifest["reproduces"] = {
        "run_id": rep.manifest["run_id"],
        "run_dir": str(rep.run_dir.resolve()),
        "spec_sha256": rep.manifest.get("spec_sha256"),
        "spec_source": rep.spec_source,
    }
    st.write_manifest(manifest)


def rerun(rep: Reproduction, results_dir: Path, progress: Any = None) -> Any:
    """Run the spec again (runner.run_experiment, with its lock, doctor and teardown)
    into results_dir; returns the runner's outcome, its manifest marked."""
    from orchestrator import runner

    with spec_file(rep) as path:
        outcome = runner.run_experiment(path, results_dir, None, progress)
        mark_reproduction(rep, Path(outcome.store.root), path)
    return outcome


def ratio_text(b: float, a: float) -> str:
    return f"{b / a:.3f}" if a else "–"


def saving_verdict(metrics: Any) -> list[str]:
    """One line per saving metric of a comparison (analysis.compare_runs' metrics):
    the medians, the ratio, and whether a difference was called."""
    from orchestrator.results import analysis, text

    if metrics.empty:
        return ["saving: nothing to compare (no kernel and fleet size in both runs)"]
    lines = []
    rows = metrics[metrics["metric"].isin(SAVING_METRICS)]
    for _, r in rows.iterrows():
        v = text.verdict(r, "B higher", "B lower")
        said = "significant difference" if r.get("significant") else "no significant difference"
        lines.append(
            f"{analysis.TRIAL_METRICS[r['metric']]} [{r['kernel_a']}, {r['fleet_size']} guests]: "
            f"A {text.fmt_value(r['median_a'])}, B {text.fmt_value(r['median_b'])}, "
            f"B/A {ratio_text(r['median_b'], r['median_a'])}: {said} ({v})"
        )
    return lines or ["saving: no saving metric measured in both runs"]
