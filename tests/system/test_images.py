"""The tiny guest image: cache behaviour, byte-identical rebuilds, and one real TCG boot."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.errors import HostError
from orchestrator.images import CMDLINE, TinyImage, build_tiny_image, find_tiny_image
from orchestrator.proc import spawn_group, stop_group
from tests.qga import Agent, wait_for_marker

pytestmark = pytest.mark.system

READY_TIMEOUT_S = 60.0
CACHE_HIT_LIMIT_S = 5.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def image() -> TinyImage:
    """Build the image into the project's images/out, or reuse it (the cache is the point)."""
    for tool in ("apt-cache", "apt-get", "dpkg", "depmod", "make", "gcc", "ldd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: cannot build the tiny image")
    try:
        return build_tiny_image()
    except HostError as e:
        pytest.skip(f"host cannot build the tiny image: {e}")


def test_second_build_is_a_fast_cache_hit(image: TinyImage) -> None:
    t0_ns = time.monotonic_ns()
    again = build_tiny_image()
    elapsed_s = (time.monotonic_ns() - t0_ns) / 1e9
    assert again.cache_hit
    assert (again.key, again.kernel, again.initrd) == (image.key, image.kernel, image.initrd)
    assert elapsed_s < CACHE_HIT_LIMIT_S
    assert find_tiny_image().key == image.key


def test_manifest_describes_the_artifacts(image: TinyImage) -> None:
    manifest = json.loads(image.manifest.read_text())
    assert manifest["key"] == image.key == image.kernel.parent.name
    assert re.fullmatch(r"linux-image-6\.1\.0-\d+-cloud-amd64", manifest["kernel"]["package"])
    for name, path in (("vmlinuz", image.kernel), ("initrd.img", image.initrd)):
        record = manifest["artifacts"][name]
        assert record == {"sha256": sha256(path), "size_bytes": path.stat().st_size}
    assert manifest["qemu_ga_version"] == manifest["packages"]["qemu-guest-agent"]
    assert isinstance(manifest["build_s"], float)


def test_find_tiny_image_without_a_build_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="make images"):
        find_tiny_image(tmp_path)


def test_forced_rebuild_is_byte_identical(image: TinyImage, tmp_path: Path) -> None:
    rebuilt = build_tiny_image(tmp_path, force=True)
    assert not rebuilt.cache_hit and rebuilt.key == image.key
    assert sha256(rebuilt.kernel) == sha256(image.kernel)
    assert sha256(rebuilt.initrd) == sha256(image.initrd)


def qemu_argv(image: TinyImage, agent_socket: Path) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-nographic",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", CMDLINE,
        "-device", "virtio-serial",
        "-chardev", f"socket,id=qga0,path={agent_socket},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-no-reboot",
    ]  # fmt: skip


@pytest.fixture
def booted(image: TinyImage, tmp_path: Path) -> Iterator[tuple[Path, Path, float]]:
    """One TCG guest; yields (console log, agent socket, seconds to ready); always killed."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    console, agent_socket = tmp_path / "console.log", tmp_path / "qga.sock"
    with console.open("wb") as log:
        qemu = spawn_group(qemu_argv(image, agent_socket), stdout=log.fileno(), stderr=log.fileno())
    try:
        ready_s = wait_for_marker(console, "DENSITYLAB: ready", READY_TIMEOUT_S)
        yield console, agent_socket, ready_s
    finally:
        stop_group(qemu)


def test_guest_boots_to_ready_and_the_agent_works(booted: tuple[Path, Path, float]) -> None:
    console, agent_socket, ready_s = booted
    print(f"boot to ready: {ready_s:.1f} s")
    assert "DENSITYLAB: boot ok" in console.read_text()
    agent = Agent(agent_socket)
    try:
        agent.sync(123)
        assert agent.call("guest-ping") == {}
        rc, out, _ = agent.exec_sh(
            "cat /sys/class/virtio-ports/*/name; readlink /dev/virtio-ports/org.qemu.guest_agent.0;"
            " test -b /dev/zram0 && echo zram ok"
        )
        assert rc == 0 and out.split() == ["org.qemu.guest_agent.0", "/dev/vport0p1", "zram", "ok"]
        rc, out, _ = agent.exec_sh("dlfill --mib 16 --dup 0.5 --zero 0.5 --console /dev/console")
        assert rc == 0 and out.startswith("DLFILL DONE "), out
        assert json.loads(out.removeprefix("DLFILL DONE "))["dup_pages"] == 2048
        wait_for_marker(console, "DLFILL DONE ", 10)
        rc, out, _ = agent.exec_sh("exit 7")
        assert rc == 7
    finally:
        agent.close()
