"""The tiny guest through real libvirt: boot, guest agent, teardown leaves nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator import fleet
from orchestrator.errors import GuestError

pytestmark = pytest.mark.system


def guest(name: str, image, tmp_path: Path, **kw) -> fleet.GuestSpec:
    return fleet.GuestSpec(
        name=name,
        memory_mib=kw.pop("memory_mib", 192),
        vcpus=1,
        image=kw.pop("img", fleet.GuestImage(image.kernel, image.initrd)),
        console_log=tmp_path / f"{name}.log",
        **kw,
    )


def test_boot_ready_exec_and_teardown(tiny_image, tmp_path: Path, host_untouched) -> None:
    conn = fleet.connect()
    t0 = time.monotonic()
    with fleet.Fleet(conn, "pytest-fleet-0001", "t0", "qemu") as fl:
        fl.define([guest("dl-pytest-fleet-g0", tiny_image, tmp_path)])
        fl.start_all()
        fl.wait_ready(timeout_s=60)
        assert time.monotonic() - t0 < 60
        g = fl.guests[0]
        assert g.pid and Path(f"/proc/{g.pid}").exists()
        assert fleet.tagged_domains(conn, "pytest-fleet-0001") == [
            ("dl-pytest-fleet-g0", "pytest-fleet-0001")
        ]
        r = fl.guest_exec(g.name, ["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"])
        assert (r.rc, r.stdout, r.stderr) == (3, "hello\n", "oops\n")
        assert "DENSITYLAB: ready" in (tmp_path / "dl-pytest-fleet-g0.log").read_text()
    assert fleet.tagged_domains(conn) == []
    assert not Path(f"/proc/{g.pid}").exists()
    conn.close()


def test_overlay_is_made_and_removed(tiny_image, tmp_path: Path, host_untouched) -> None:
    backing = tmp_path / "scratch.raw"
    backing.write_bytes(b"\0" * (1 << 20))
    overlay = fleet.OVERLAY_ROOT / "pytest-fleet-0002" / "g0.qcow2"
    img = fleet.GuestImage(tiny_image.kernel, tiny_image.initrd, disk=backing)
    conn = fleet.connect()
    with fleet.Fleet(conn, "pytest-fleet-0002", "t0", "qemu") as fl:
        fl.define([guest("dl-pytest-fleet-ov", tiny_image, tmp_path, img=img, overlay=overlay)])
        assert overlay.exists()
        fl.start_all()
        fl.wait_ready(timeout_s=60)
        r = fl.guest_exec("dl-pytest-fleet-ov", ["/bin/sh", "-c", "cat /sys/block/vda/size"])
        assert r.stdout.strip() == str((1 << 20) // 512)
    assert not overlay.exists()
    assert not overlay.parent.exists()
    conn.close()


def test_guest_that_cannot_boot_fails_clearly(tiny_image, tmp_path: Path, host_untouched) -> None:
    # Failure injection: a truncated initramfs makes the guest kernel panic at boot.
    broken = tmp_path / "broken-initrd.img"
    broken.write_bytes(tiny_image.initrd.read_bytes()[:4096])
    img = fleet.GuestImage(tiny_image.kernel, broken)
    conn = fleet.connect()
    with (
        pytest.raises(GuestError, match="dl-pytest-fleet-bad"),
        fleet.Fleet(conn, "pytest-fleet-0003", "t0", "qemu") as fl,
    ):
        fl.define([guest("dl-pytest-fleet-bad", tiny_image, tmp_path, img=img)])
        bad = fl.guests[0]
        fl.start_all()
        fl.wait_ready(timeout_s=60)
    # A panic before ready gets one more boot (TCG flakes); the first console is kept.
    assert bad.boot_retries == fleet.BOOT_RETRIES == 1
    assert "Kernel panic" in (tmp_path / "dl-pytest-fleet-bad.panic1.log").read_text()
    assert "Kernel panic" in (tmp_path / "dl-pytest-fleet-bad.log").read_text()
    assert fleet.tagged_domains(conn) == []
    conn.close()
