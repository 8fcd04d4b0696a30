"""The image builder's own logic: cache key, module selection, ldd parsing, cpio writer."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator.errors import HostError, UsageError
from orchestrator.images import (
    BuildInputs,
    CpioEntry,
    KernelPackage,
    cache_key,
    module_name,
    parse_ldd,
    select_modules,
    source_digests,
    write_newc,
)

# `ldd /usr/sbin/qemu-ga` on Debian 12 (qemu-guest-agent 1:7.2+dfsg-7+deb12u18+b3)
LDD_QEMU_GA = """\
\tlinux-vdso.so.1 (0x00007fdc520e7000)
\tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007fdc51fb0000)
\tlibnuma.so.1 => /lib/x86_64-linux-gnu/libnuma.so.1 (0x00007fdc51fa3000)
\tliburing.so.2 => /lib/x86_64-linux-gnu/liburing.so.2 (0x00007fdc51f9c000)
\tlibglib-2.0.so.0 => /lib/x86_64-linux-gnu/libglib-2.0.so.0 (0x00007fdc51e64000)
\tlibgmodule-2.0.so.0 => /lib/x86_64-linux-gnu/libgmodule-2.0.so.0 (0x00007fdc51e5e000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007fdc51d7c000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fdc51b9a000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007fdc520e9000)
\tlibpcre2-8.so.0 => /lib/x86_64-linux-gnu/libpcre2-8.so.0 (0x00007fdc51b00000)
"""

# Excerpts of modules.dep / modules.builtin of linux-image-6.1.0-56-cloud-amd64
MODULES_DEP = """\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/zram/zram.ko: kernel/mm/zsmalloc.ko
kernel/crypto/lzo-rle.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
"""
MODULES_BUILTIN = "kernel/lib/lzo/lzo_compress.ko\nkernel/drivers/tty/serial/8250/8250.ko\n"


def inputs() -> BuildInputs:
    return BuildInputs(
        kernel=KernelPackage("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2", "e7" * 32),
        packages={"busybox-static": "1:1.35.0-4+deb12u1+b1", "libc6": "2.36-9+deb12u14"},
        tools={"gcc": "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"},
        sources={"images/tiny/init": "aa" * 32},
        host_files={"/bin/busybox": "bb" * 32},
        libs=("/lib64/ld-linux-x86-64.so.2",),
    )


def test_cache_key_ignores_dict_order() -> None:
    a = inputs()
    b = dataclasses.replace(a, packages=dict(reversed(list(a.packages.items()))))
    assert cache_key(a) == cache_key(b)


@pytest.mark.parametrize(
    "change",
    [
        {"kernel": KernelPackage("linux-image-6.1.0-57-cloud-amd64", "6.1.193-1", "e7" * 32)},
        {"packages": {"busybox-static": "1:1.36", "libc6": "2.36-9+deb12u14"}},
        {"tools": {"gcc": "gcc 13"}},
        {"host_files": {"/bin/busybox": "cc" * 32}},
        {"libs": ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libz.so.1")},
    ],
)
def test_cache_key_changes_with_any_input(change: dict[str, object]) -> None:
    assert cache_key(dataclasses.replace(inputs(), **change)) != cache_key(inputs())  # type: ignore[arg-type]


def test_editing_a_source_changes_the_key(tmp_path: Path) -> None:
    init = tmp_path / "images" / "tiny" / "init"
    init.parent.mkdir(parents=True)
    init.write_text("#!/bin/sh\necho DENSITYLAB: ready\n")

    def key() -> str:
        return cache_key(
            dataclasses.replace(inputs(), sources=source_digests([init], root=tmp_path))
        )

    before = key()
    assert key() == before
    init.write_text("#!/bin/sh\necho DENSITYLAB: ready \n")
    assert key() != before


def test_source_digests_refuses_a_missing_source(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="build source missing"):
        source_digests([tmp_path / "nope"], root=tmp_path)


def test_parse_ldd_keeps_libraries_and_loader_not_vdso() -> None:
    libs = parse_ldd(LDD_QEMU_GA)
    assert "/lib64/ld-linux-x86-64.so.2" in libs
    assert "/lib/x86_64-linux-gnu/libglib-2.0.so.0" in libs
    assert len(libs) == 9 and list(libs) == sorted(libs)
    assert not any("vdso" in lib for lib in libs)


def test_parse_ldd_refuses_a_missing_library() -> None:
    with pytest.raises(HostError, match=r"libfoo\.so\.1 not found"):
        parse_ldd("\tlibfoo.so.1 => not found\n")


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/crypto/lzo-rle.ko", "lzo_rle"),
        ("kernel/crypto/lzo-rle.ko.xz", "lzo_rle"),
        ("kernel/drivers/virtio/virtio_pci.ko.zst", "virtio_pci"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_select_modules_brings_dependencies_and_skips_builtins() -> None:
    sel = select_modules(
        MODULES_DEP, MODULES_BUILTIN, ["virtio_console", "zram", "lzo-rle", "8250"]
    )
    assert sel.files == (
        "kernel/crypto/lzo-rle.ko",
        "kernel/drivers/block/zram/zram.ko",
        "kernel/drivers/char/virtio_console.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/mm/zsmalloc.ko",
    )
    assert sel.builtin == ("8250",)


def test_select_modules_refuses_an_unknown_module() -> None:
    with pytest.raises(HostError, match="no module nosuch"):
        select_modules(MODULES_DEP, MODULES_BUILTIN, ["nosuch"])


def test_newc_archive_reads_back_with_gnu_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    entries = [
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    archive = write_newc(entries)
    assert archive == write_newc(list(reversed(entries))), "order of input must not matter"
    listing = subprocess.run(
        ["cpio", "-itv", "--numeric-uid-gid", "--quiet"],
        input=archive,
        capture_output=True,
        check=True,
    ).stdout.decode()
    lines = [line.split() for line in listing.splitlines()]
    assert [parts[-1] for parts in lines] == ["bin", "/bin/busybox", "dev", "dev/console", "init"]
    console = next(parts for parts in lines if parts[-1] == "dev/console")
    assert console[0] == "crw-------" and console[2:4] == ["0", "0"] and console[4:6] == ["5,", "1"]
    assert all("1970" in parts for parts in lines)
