"""Kernels built from source: Debian's linux-source-6.12 built by orchestrator.kbuild
(tinyconfig + the lab fragment, everything built in) boots the lab image's rootfs
without an initramfs, as a `build:` kernel entry; a config lacking KSM stops the build
with one line and leaves nothing in the cache.

The build itself is cached in $DENSITYLAB_KBUILD_CACHE (default
/var/cache/densitylab/kbuild): a machine pays one cold build (~15-25 min on 2 cores),
every later run finds it in seconds. Run under the heavy lock (it boots a TCG VM).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orchestrator import kbuild, labimage
from orchestrator.errors import HostError
from orchestrator.images import build_dlfill
from orchestrator.kernelspec import (
    BuildKernel,
    DebianSource,
    DebKernel,
    KernelConfig,
    KernelEntry,
    SourceKernel,
)
from orchestrator.proc import stop_group
from tests.labboot import boot_until_ready
from tests.qga import Agent

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0
BASE = SourceKernel(label="base", source=DebianSource(debian="linux-source-6.12"))


def need_tools() -> None:
    for tool in ("gcc", "make", "flex", "bison", "bc", "ccache", "patch", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (make kernels installs it)")


@pytest.fixture(scope="module")
def built() -> kbuild.BuiltKernel:
    need_tools()
    return kbuild.build(BASE)  # a cache hit after the machine's first build


@pytest.fixture(scope="module")
def image() -> labimage.LabImage:
    try:
        return labimage.find_lab_image()
    except HostError as e:
        pytest.skip(str(e))


@contextmanager
def boot_entry(
    image: labimage.LabImage, entry: KernelEntry, tmp: Path
) -> Iterator[tuple[labimage.LabKernel, Agent, Path]]:
    """Boot the lab rootfs with an entry's kernel; always killed, overlay deleted."""
    kernel = labimage.resolve_kernel(image, entry)
    console = tmp / "console.log"
    plan = labimage.BootPlan(image, kernel, tmp / "overlay.qcow2", tmp / "qga.sock")
    qemu, _ = boot_until_ready(plan, console, READY_TIMEOUT_S)
    try:
        agent = Agent(plan.agent_socket)
        try:
            agent.sync()
            yield kernel, agent, console
        finally:
            agent.close()
    finally:
        stop_group(qemu)
        plan.overlay.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def booted(
    built: kbuild.BuiltKernel, image: labimage.LabImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[labimage.LabKernel, Agent, Path]]:
    entry = BuildKernel(label="built", build=str(built.directory))
    with boot_entry(image, entry, tmp_path_factory.mktemp("kbuild-boot")) as b:
        yield b


def test_build_entry_boots_the_lab_rootfs_without_initrd(
    built: kbuild.BuiltKernel, booted: tuple[labimage.LabKernel, Agent, Path]
) -> None:
    kernel, a, console = booted
    assert kernel.initrd is None and kernel.vmlinuz == built.bzimage
    assert kernel.release == built.release and "+dl" in built.release
    assert a.ok("uname -r").strip() == built.release
    assert "DENSITYLAB: boot ok" in console.read_text(errors="replace")
    assert {"node0", "node1"} <= set(a.ok("ls /sys/devices/system/node").split())
    assert "memory" in a.ok("cat /sys/fs/cgroup/cgroup.subtree_control").split()
    assert a.ok("test -b /dev/zram0 && echo zram").strip() == "zram"
    assert a.ok("cat /sys/kernel/mm/ksm/run").strip() in ("0", "1")
    assert "rmap_walk_ksm" in a.ok("grep -w rmap_walk_ksm /proc/kallsyms")
    a.ok(
        "cd /sys/kernel/tracing && echo 'p:dlkb/rwk rmap_walk_ksm' >> kprobe_events"
        " && echo '-:dlkb/rwk' >> kprobe_events"
    )


def test_cache_entry_records_its_inputs(built: kbuild.BuiltKernel) -> None:
    m = built.meta
    assert m["origin"].startswith("source:debian:linux-source-6.12=")
    assert m["patches"] == [] and len(m["tree_sha256"]) == 64
    assert m["config_sha256"] == kbuild.file_sha256(built.config)
    for f in ("bzImage", "config", "System.map", "build.log", "meta.json"):
        assert (built.directory / f).is_file(), f
    got = kbuild.kernels.parse_kconfig(built.config.read_text())
    assert got["CONFIG_KSM"] == "y" and got.get("CONFIG_MODULES", "n") == "n"


def test_config_lacking_ksm_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A fragment unsetting KSM: ConfigLacks after olddefconfig, no cache entry."""
    need_tools()
    src = kbuild.cache_root() / "src"
    debs = sorted(src.glob("linux-source-6.12_*_all.deb"))
    if not debs:
        pytest.skip(f"no linux-source-6.12 .deb in {src} yet")
    cache = tmp_path / "cache"
    (cache / "src").mkdir(parents=True)
    os.symlink(debs[-1], cache / "src" / debs[-1].name)
    frag = tmp_path / "no-ksm.config"
    frag.write_text("# CONFIG_KSM is not set\n")
    entry = BASE.model_copy(update={"config": KernelConfig(fragment=str(frag))})
    with pytest.raises(kbuild.ConfigLacks) as e:
        kbuild.build(entry, cache=cache)
    assert str(e.value).startswith("kernel base: config lacks CONFIG_KSM=y after olddefconfig")
    assert "\n" not in str(e.value)
    assert not (cache / "builds").exists() or not any((cache / "builds").iterdir())


def test_bindeb_pkg_of_the_same_tree_boots_as_a_deb_entry(
    built: kbuild.BuiltKernel, image: labimage.LabImage, tmp_path: Path
) -> None:
    """make bindeb-pkg from the tree and config the cache entry was built from: the
    linux-image .deb boots the lab rootfs as a `deb:` entry, same `uname -r`."""
    debs = kbuild.bindeb(BASE, tmp_path / "debs")
    names = [d.name for d in debs]
    assert any(n.startswith(f"linux-image-{built.release}_") for n in names), names
    entry = DebKernel(label="pkg", deb=[str(d) for d in debs])
    with boot_entry(image, entry, tmp_path) as (kernel, a, _console):
        assert kernel.initrd is None and kernel.origin.startswith("deb:")
        assert a.ok("uname -r").strip() == built.release
        assert a.ok("cat /sys/kernel/mm/ksm/run").strip() in ("0", "1")


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line mentions text (to check that nothing is left running)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def test_sigterm_mid_build_leaves_nothing_half_built(tmp_path: Path) -> None:
    """SIGTERM while make compiles: exit 130, make's whole group gone, no cache entry."""
    need_tools()
    debs = sorted((kbuild.cache_root() / "src").glob("linux-source-6.12_*_all.deb"))
    if not debs:
        pytest.skip("no linux-source-6.12 .deb cached yet")
    cache = tmp_path / "cache"
    (cache / "src").mkdir(parents=True)
    os.symlink(debs[-1], cache / "src" / debs[-1].name)
    spec = tmp_path / "k.yaml"
    spec.write_text(
        "name: k\nhost: {kind: labvm}\n"
        "kernels: [{label: base, source: {debian: linux-source-6.12}}]\n"
    )
    env = {**os.environ, kbuild.CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "orchestrator.cli", "kernels", "build", str(spec)]
    proc = subprocess.Popen(cli, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list((cache / "builds").glob(".tmp-*/build.log"))
            if logs and logs[0].read_text().count("  CC ") >= 5:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no compile started (rc {proc.poll()})")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "densitylab: interrupted by signal 15"
    assert list((cache / "builds").iterdir()) == []
    assert processes_mentioning(str(cache)) == []


PATCHED = SourceKernel(
    label="patched",
    source=DebianSource(debian="linux-source-6.12"),
    patches=[str(REPO / "experiments" / "patches")],
)


@pytest.mark.parametrize("entry", [BASE, PATCHED], ids=["base", "patched"])
def test_merged_fragmented_pages_migrate_on_both_kernels_of_the_pair(
    entry: SourceKernel, image: labimage.LabImage, tmp_path: Path
) -> None:
    """The patch A/B in small: 2 x 16 MiB in 2,000 VMAs of one anon_vma merge, migrate
    to node 1 with rmap_walk_ksm timed by kprobes, and the kernel logs no BUG or WARNING.
    Prints the walk figures of each kernel (the patched one should be far cheaper)."""
    from tests.system import test_labhost as lh

    need_tools()
    built = kbuild.build(entry)
    (tmp_path / "dlfill").mkdir()
    dlfill = build_dlfill(tmp_path / "dlfill").read_bytes()
    box = BuildKernel(label=entry.label, build=str(built.directory))
    with boot_entry(image, box, tmp_path) as (_kernel, a, _console):
        assert a.ok("uname -r").strip() == built.release
        # boot-time warnings are QEMU's (topology_sane with two NUMA cells, on both
        # kernels): only what the kernel logs from here on counts
        booted_lines = len(a.ok("dmesg").splitlines())
        a.push(dlfill, "/usr/local/bin/dlfill", 0o755)
        a.ok(lh.KSM_SETUP.format(mib=lh.DLFILL_MIB, vmas=lh.FRAGMENT_VMAS))
        try:
            for i in (1, 2):
                deadline = time.monotonic() + 120
                while "DLFILL DONE" not in a.ok(f"cat /tmp/dlfill{i}.out"):
                    assert time.monotonic() < deadline, a.ok(f"cat /tmp/dlfill{i}.out")
                    time.sleep(0.5)
            lh.wait_merged(a, int(lh.DLFILL_PAGES * 0.9), lh.MERGE_TIMEOUT_S)
            pid = a.ok("cat /tmp/dlfill1.pid").strip()
            before = lh.node_pages(a, pid)
            a.ok(lh.TRACE_ON)
            try:
                a.ok(f"migratepages {pid} 0 1", timeout_s=600)
            finally:
                a.ok(lh.TRACE_OFF)
            after = lh.node_pages(a, pid)
            rc, trace, err = a.exec_sh("cat /tmp/rwk.trace", 120)
            assert rc == 0, err
            dmesg = "\n".join(a.ok("dmesg").splitlines()[booted_lines:])
        finally:
            a.exec_sh("kill $(cat /tmp/dlfill1.pid /tmp/dlfill2.pid) 2>/dev/null; echo 2 > "
                      "/sys/kernel/mm/ksm/run")  # fmt: skip
    entries, returns, durations = lh.walk_durations_us(trace)
    walk = sorted(durations)
    print(
        f"\nKBUILD {entry.label} {built.release}: walks {len(walk)}, median "
        f"{walk[len(walk) // 2] if walk else 0:.1f} us, max {walk[-1] if walk else 0:.1f} us"
    )
    assert after.get("N1", 0) > before.get("N1", 0), (before, after)
    assert entries > 0 and returns > 0, trace[-2000:]
    # "BUG: ..." / "kernel BUG at" and "WARNING: CPU: ..." (not DEBUG in a boot line)
    oops = re.search(r"^.*(\bBUG[: ]|kernel BUG at|WARNING: CPU).*$", dmesg, flags=re.M)
    assert oops is None, oops[0] if oops else ""
