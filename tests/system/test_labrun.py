"""A lab host booting a Debian kernel: the host agent runs in it and kprobes time real
rmap_walk_ksm walks of a small fragmented workload, through the normal run path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.agent import ksm

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

SPEC = """\
name: lab-ci
host: {kind: labvm, memory_mib: 2048, vcpus: 2, numa_cells: 2}
kernels: ["%s"]
fleet: {count: 2}
workload: {mib: 8, dup: 1.0}
host_workload: {copies: 2, mib: 8, fragment_vmas: 1000}
ksm: {pages_to_scan: 5000, sleep_millisecs: 10}
phases:
  merge: {timeout_s: 180, settle_scans: 3}
  migrate: {enabled: true, repeats: 1, settle_s: 0, pages: 1024}
  reclaim: {enabled: true, swap_mib: 256, reclaim_mib: 16, settle_s: 0}
latency: {method: kprobe}
"""


@pytest.fixture(scope="module")
def lab_image(lab: None):
    from orchestrator import labimage

    try:
        return labimage.find_lab_image()
    except Exception as e:  # built by `make lab-images`, which `make test` runs
        pytest.skip(f"lab image missing: {e}")


def test_lab_host_kprobe_samples(lab_image, tmp_path: Path, host_untouched) -> None:
    kernel = (
        "7.3" if any(k.label == "7.3" for k in lab_image.kernels) else lab_image.kernels[0].label
    )
    host_ksm_before = ksm.read_ksm_knobs()
    spec = tmp_path / "lab.yaml"
    spec.write_text(SPEC % kernel)
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "run",
            str(spec),
            "--results",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert cp.returncode == 0, cp.stderr
    run = next((tmp_path / "r").iterdir())
    t = pd.read_parquet(run / "trials.parquet").iloc[0]
    assert t.kernel == kernel and t.kernel_release.startswith(kernel)
    assert t.latency_method == "kprobe"
    lat = pd.read_parquet(run / "latency.parquet")
    by = lat.groupby("trigger").size()
    assert by.get("migrate", 0) > 100 and by.get("reclaim", 0) > 0, by.to_dict()
    assert not lat.lower_bound.any() and (lat.method == "kprobe").all()
    assert "collector: stopped" in next(run.glob("trials/*/lab-collector.log")).read_text()
    # Each process is migrated and reclaimed on its own: its walks carry its own VMA
    # count and the mappings its pattern gives a KSM page; other walks are unattributed.
    for trigger in ("migrate", "reclaim"):
        rows = lat[lat.trigger == trigger]
        assert rows.target.notna().mean() > 0.95, trigger  # the rest: other kernel work
        loose = rows[rows.target.isna()]
        assert (loose.target_kind == "unattributed").all() and loose.vmas.isna().all()
        rows = rows[rows.target.notna()]
        frag = rows[rows.target.str.startswith("fragmented")]
        assert len(frag) > 0 and (frag.vmas == 1000).all() and (frag.mappings == 2).all()
        assert (frag.target_kind == "host-copy").all()
        pat = rows[rows.target.str.startswith("pattern")]
        assert (pat.vmas == 1).all() and (pat.target_kind == "host-process").all()
    # The first of two sharers moves the shared KSM page; the second finds it moved.
    assert {"pattern-0", "fragmented-0"} <= set(lat[lat.trigger == "migrate"].target)
    # The entry probe fetched each walk's rmap_one: a page moved is unmapped, then remapped.
    walk_funcs = set(lat[lat.trigger == "migrate"].rmap_one.dropna())
    assert {"try_to_migrate_one", "remove_migration_pte"} <= walk_funcs, walk_funcs
    assert lat.rmap_one.notna().all()
    moved = pd.read_parquet(run / "events.parquet").query("event == 'migrated-process'")
    assert moved.detail.str.contains("move_pages").all() and len(moved) == 4
    assert 1.9 < t.mappings_per_ksm_page < 2.1  # every KSM page here has two mappings
    # 2 pattern processes (8 MiB, all duplicated) + 2 fragmented copies (8 MiB): 16 MiB.
    assert t.predicted_saving_mib == pytest.approx(16.0, abs=0.1)
    assert t.measured_saving_mib == pytest.approx(t.predicted_saving_mib, rel=0.10)
    assert ksm.read_ksm_knobs() == host_ksm_before, "the lab host's KSM is its own"
    # Every lab process verified its pages after merge, migrate, reclaim and swap-off.
    integ = pd.read_parquet(run / "integrity.parquet")
    assert set(integ.phase) == {"merge", "migrate", "reclaim", "restore", "attribute"}
    assert (integ.groupby("phase").workload.nunique() == 4).all() and (integ.mismatches == 0).all()
    assert "pages verified 40960, corrupted 0" in cp.stdout  # 5 checks x 4 x 2048 pages
