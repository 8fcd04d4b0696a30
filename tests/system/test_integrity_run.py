"""A whole run with the page integrity checks: tiny guests, host copies, migrate,
reclaim with swap, attribute; every page verified after each step, none corrupted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import images

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]

SPEC = """\
name: integrity
fleet: {count: 2, memory_mib: 256}
workload: {mib: 32, dup: 0.5, zero: 0.125, unique: 0.25, volatile: 0.125,
           volatile_rate_pps: 500}
host_workload: {copies: 2, mib: 8, fragment_vmas: 100}
ksm: {pages_to_scan: 4000, sleep_millisecs: 10}
phases:
  baseline: {enabled: false}
  merge: {settle_scans: 3}
  hold: {duration_s: 1}
  migrate: {enabled: true, method: compaction, repeats: 2, settle_s: 1}
  reclaim: {enabled: true, swap: zram, swap_mib: 512, v1_limit_steps_mib: [200, 120],
            reclaim_mib: 32, settle_s: 1}
latency: {method: none}
seed: 5
"""


def image_verifies(image: images.TinyImage) -> bool:
    """The image's dlfill is this tree's (older ones die on SIGUSR2)."""
    built = json.loads(image.manifest.read_text())["inputs"]["sources"]
    dlfill_c = images.WORKLOAD_DIR / "dlfill.c"
    return bool(built["images/workload/dlfill.c"] == images.sha256_file(dlfill_c))


def test_every_page_is_verified_after_every_step(tiny_image, tmp_path: Path, host_untouched):
    if not image_verifies(tiny_image):
        pytest.fail("the tiny image's dlfill is older than images/workload/dlfill.c: make images")
    spec = tmp_path / "integrity.yaml"
    spec.write_text(SPEC)
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert cp.returncode == 0, cp.stderr
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    df = pd.read_parquet(run / "integrity.parquet")
    checks = df.groupby(["phase", "step"]).workload.apply(sorted).to_dict()
    guests = sorted(w for w in df.workload.unique() if not w.startswith("host-"))
    assert [g[-2:] for g in guests] == ["g0", "g1"]
    everyone = sorted([*guests, "host-dlfill-0", "host-dlfill-1"])
    assert set(checks) == {
        ("merge", 0),
        ("migrate", 0),
        ("migrate", 1),
        ("reclaim", 0),
        ("restore", 0),
        ("attribute", 0),
    }
    assert all(w == everyone for w in checks.values()), checks
    assert (df.mismatches == 0).all() and (df.first_mismatch_pages == "").all()
    # 2 guests x 32 MiB + 2 host copies x 8 MiB, in pages, at each of the 6 checks
    assert df.pages_checked.sum() == 6 * (2 * 32 + 2 * 8) * 256
    (line,) = [ln for ln in cp.stdout.splitlines() if "pages verified" in ln]
    assert line.endswith(f"pages verified {6 * 80 * 256}, corrupted 0"), line
    # reclaim really swapped workload pages out, so the checks read them back in
    deltas = pd.read_parquet(run / "phase_deltas.parquet")
    swapped = deltas[(deltas.phase == "reclaim") & (deltas.counter == "pswpout")].delta.sum()
    assert swapped > 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert "integrity.parquet" in manifest["files"]


def test_a_guest_page_changed_behind_dlfills_back_is_reported(
    tiny_image, tmp_path: Path, host_untouched
) -> None:
    """The guest path can fail: root in the guest writes into dlfill through
    /proc/PID/mem, and the verify play reports that page by its index."""
    from orchestrator import fleet
    from orchestrator.spec import Workload
    from orchestrator.workload import WorkloadDriver

    if not image_verifies(tiny_image):
        pytest.fail("the tiny image's dlfill is older than images/workload/dlfill.c: make images")
    name = "dl-pytest-integrity-g0"
    conn = fleet.connect()
    try:
        with fleet.Fleet(conn, "pytest-integrity-0001", "t0", "qemu") as fl:
            fl.define(
                [
                    fleet.GuestSpec(
                        name=name,
                        memory_mib=192,
                        vcpus=1,
                        image=fleet.GuestImage(tiny_image.kernel, tiny_image.initrd),
                        console_log=tmp_path / f"{name}.log",
                    )
                ]
            )
            fl.start_all()
            fl.wait_ready(timeout_s=120)
            w = Workload(mib=8, dup=0.5, zero=0.25, unique=0.25)
            driver = WorkloadDriver([name], tmp_path / "ansible", fleet.URI)
            try:
                driver.start(w, 11, 120)
                driver.wait_filled(w, 11, 120)
                (clean,) = driver.verify(timeout_s=120)
                assert (clean.workload, clean.pages, clean.mismatches) == (name, 2048, 0)
                done = fl.read_file(name, "/run/dlfill.out").decode().splitlines()[0]
                addr = int(json.loads(done.removeprefix("DLFILL DONE "))["addr"], 16)
                for page in (5, 1030, 1600):  # dup, zero, unique
                    poke = (
                        "printf XXXXXXXX | dd of=/proc/$(cat /run/dlfill.pid)/mem bs=1 "
                        f"seek={addr + page * 4096 + 512} count=8 conv=notrunc 2>/dev/null"
                    )
                    r = fl.guest_exec(name, ["/bin/sh", "-c", poke])
                    assert r.rc == 0, r.stderr
                (bad,) = driver.verify(timeout_s=120)
                assert (bad.mismatches, bad.first, bad.seq) == (3, (5, 1030, 1600), 2)
            finally:
                driver.stop()
    finally:
        conn.close()
