"""Shared fixtures. System tests use the real lab daemons, real guests and real KSM."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirt system instance, KSM knobs)")


@pytest.fixture(scope="session")
def lab() -> Iterator[None]:
    """The lab daemons for the whole session; stopped at the end only if we started them."""
    needs_root()
    labd = REPO / "scripts" / "labd"
    was_running = subprocess.run([labd, "status"], capture_output=True).returncode == 0
    cp = subprocess.run([labd, "start"], capture_output=True, text=True, timeout=120)
    if cp.returncode != 0:
        pytest.fail(f"scripts/labd start failed: {cp.stderr.strip()}")
    yield
    if not was_running:
        subprocess.run([labd, "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tiny_image(lab: None):
    from orchestrator import images

    try:
        return images.find_tiny_image()
    except Exception as e:  # the image is built by `make images`, which `make test` runs
        pytest.skip(f"tiny image missing: {e}")


@pytest.fixture(scope="session")
def debian_image(lab: None):
    """The Debian guest image, built once per machine and cached by its input hash in
    $DENSITYLAB_IMAGE_CACHE (default /var/cache/densitylab/images): ~1 min cold, well
    under a second warm."""
    from orchestrator import debimage

    if subprocess.run(["which", "mmdebstrap"], capture_output=True).returncode != 0:
        pytest.skip("mmdebstrap missing: make debian-image installs it")
    return debimage.build_debian_image()


def ksm_knobs() -> dict[str, str]:
    from orchestrator.agent import ksm

    return ksm.read_ksm_knobs()


@pytest.fixture
def host_untouched(lab: None) -> Iterator[dict[str, str]]:
    """Asserts after the test that no domain, overlay, sampler or KSM change is left."""
    from orchestrator import fleet
    from orchestrator.agent import fs, procs

    before = ksm_knobs()
    yield before
    conn = fleet.connect()
    try:
        assert fleet.tagged_domains(conn) == [], "densitylab domains left behind"
    finally:
        conn.close()
    assert ksm_knobs() == before, "KSM knobs not restored"
    assert procs.find_samplers() == [], "sampler processes left running"
    assert not list(fs.STATE_DIR.glob("ksm-*.json")), "saved KSM state left behind"
    overlays = list(fleet.OVERLAY_ROOT.iterdir()) if fleet.OVERLAY_ROOT.exists() else []
    assert overlays == [], "overlays left behind"
    assert_no_tool_state()


def assert_no_tool_state() -> None:
    """No swap, trace instance, kprobe event, cgroup or mount densitylab made is left."""
    from orchestrator.agent import fs, trace

    assert Path("/proc/swaps").read_text().count("\n") == 1, "swap left on"
    assert not list(fs.STATE_DIR.glob("swap-*.json")), "swap state left behind"
    for z in Path("/sys/block").glob("zram*"):
        assert (z / "disksize").read_text().strip() == "0", f"{z} not reset"
    assert not list(Path("/sys/fs/cgroup/memory").glob("densitylab-*")), "cgroup left behind"
    mounts = Path("/proc/self/mounts").read_text()
    assert str(fs.STATE_DIR / "tracefs") not in mounts, "our tracefs left mounted"
    for root in {trace.tracefs_mountpoint(mounts)} - {None}:
        assert not list((root / "instances").glob("densitylab-*")), "trace instance left"
        kp = root / "kprobe_events"
        assert not kp.exists() or "densitylab_" not in kp.read_text(), "kprobes left"
