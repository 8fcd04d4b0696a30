"""The Debian guest image: a Debian 12 system from Debian packages, for guests that run
real services (redis, PostgreSQL) and ordinary Ansible modules (python3).

mmdebstrap (unshare mode: a killed build leaves no mount behind) installs bookworm from
this machine's own apt sources, read-only (/etc/apt is never changed): the cloud kernel
and initramfs-tools (MODULES=list: virtio and ext4 only), python3, qemu-guest-agent and
the packages the shipped workloads need (guests have no network). PID 1 is
images/debian/densitylab-guest-init, not systemd: it gives each guest its identity at
first boot (hostname from the kernel command line, a fresh machine-id: the image ships
an empty one), starts qemu-ga and prints the DENSITYLAB markers the fleet waits on.
`mkfs.ext4 -d` turns the tree into a raw ext4 image (no loop device, no mount); every
guest boots a qcow2 overlay on it with the kernel and initrd copied beside it:

    <root>/debian/<key>/{rootfs.ext4, vmlinuz, initrd.img, manifest.json}, current -> <key>

<root> is $DENSITYLAB_IMAGE_CACHE or /var/cache/densitylab/images: one build per
machine, shared by every clone and CI run (a cold build takes about a minute, a warm
one a few seconds). The downloaded .debs are kept under <root>/debs-bookworm.

The cache key is sha256 over the package list and dpkg options, the state of apt's
index (names, sizes, mtimes of /var/lib/apt/lists and /etc/apt: an `apt-get update`
that brings new versions gives a new key), this file and images/debian/*, and the
versions of mmdebstrap and e2fsprogs. Like the lab image it is not byte-reproducible
(dpkg stamps install times); the key names its inputs and the manifest records every
installed package and version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import images
from orchestrator.errors import DensitylabError, HostError, UsageError
from orchestrator.files import sha256_file
from orchestrator.labimage import (
    image_size_mib,
    in_root,
    installed_packages,
    make_ext4,
    run_in_group,
    tree_bytes,
    write_into,
)
from orchestrator.qemuparts import convert_to_qcow2

log = logging.getLogger(__name__)

DEBIAN_DIR = images.IMAGES_DIR / "debian"
INIT_SCRIPT = DEBIAN_DIR / "densitylab-guest-init"
INIT_PATH = "/sbin/densitylab-guest-init"
INITRAMFS_CONF = DEBIAN_DIR / "initramfs-tools" / "conf.d" / "densitylab"
INITRAMFS_HOOK = DEBIAN_DIR / "initramfs-tools" / "hooks" / "densitylab"
SOURCE_FILES = (Path(__file__).resolve(), INIT_SCRIPT, INITRAMFS_CONF, INITRAMFS_HOOK)
SUITE = "bookworm"
VARIANT = "apt"
INCLUDES = (
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "zstd",  # initramfs compression (only a Recommends of initramfs-tools)
    "kmod",
    "mount",
    "util-linux",
    "procps",
    "iproute2",
    "python3",  # ordinary Ansible modules
    "qemu-guest-agent",
    "redis-server",  # playbooks/workloads/redis.yml
    "redis-tools",
    "postgresql",  # playbooks/workloads/postgres.yml (pgbench comes with postgresql-contrib)
    "postgresql-contrib",
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
HOST_PACKAGES = ("mmdebstrap", "e2fsprogs")
CMDLINE = f"root=/dev/vda rw console=ttyS0 init={INIT_PATH} quiet panic=-1"
FREE_SPACE_MIB = 512  # room in each guest for data sets (the overlay grows, not the file)
LABEL = "dlguest"
CACHE_ENV = "DENSITYLAB_IMAGE_CACHE"
DEFAULT_ROOT = Path("/var/cache/densitylab/images")
BUILD_HINT = "run `make debian-image` (python -m orchestrator.debimage)"
MMDEBSTRAP_TIMEOUT_S = 1200


@dataclass(frozen=True)
class DebianImage:
    """A built image; paths are absolute."""

    rootfs: Path
    kernel: Path
    initrd: Path
    manifest: Path
    key: str
    cache_hit: bool
    cmdline: str = CMDLINE


@dataclass(frozen=True)
class DebianInputs:
    includes: tuple[str, ...]
    variant: str
    suite: str
    dpkg_options: tuple[str, ...]
    apt_state: str  # images.apt_state_stamp(): changes when apt's index does
    host_packages: dict[str, str]
    sources: dict[str, str]  # repo-relative path -> sha256
    free_space_mib: int

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def default_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_ROOT)


def apt_sources() -> Path:
    """This machine's Debian sources, handed to mmdebstrap as they are."""
    for path in APT_SOURCES:
        if path.is_file() and path.stat().st_size:
            return path
    raise HostError(f"no apt sources at {' or '.join(map(str, APT_SOURCES))}")


def collect_inputs() -> DebianInputs:
    return DebianInputs(
        includes=INCLUDES,
        variant=VARIANT,
        suite=SUITE,
        dpkg_options=DPKG_OPTIONS,
        apt_state=images.apt_state_stamp(),
        host_packages=images.host_package_versions(HOST_PACKAGES),
        sources=images.source_digests(SOURCE_FILES, images.REPO_ROOT),
        free_space_mib=FREE_SPACE_MIB,
    )


def mmdebstrap_argv(root: Path, sources: Path, debs: Path) -> list[str]:
    """Unshare mode, the host's sources, the .deb cache synced in and out, the initramfs
    configuration in place before the kernel is installed, an empty machine-id."""
    q = shlex.quote
    hooks = [
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives'
        ' "$1"/etc/initramfs-tools/conf.d "$1"/etc/initramfs-tools/hooks',
        f"--setup-hook=sync-in {q(str(debs))} /var/cache/apt/archives/",
        f"--setup-hook=copy-in {q(str(INITRAMFS_CONF))} /etc/initramfs-tools/conf.d/",
        f"--setup-hook=copy-in {q(str(INITRAMFS_HOOK))} /etc/initramfs-tools/hooks/",
        f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs))}",
        '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
        # One identity for nobody: each guest writes its own at first boot.
        '--customize-hook=: > "$1"/etc/machine-id; rm -f "$1"/var/lib/dbus/machine-id',
    ]
    return [
        "mmdebstrap",
        "--mode=unshare",
        f"--variant={VARIANT}",
        "--format=directory",
        f"--include={','.join(INCLUDES)}",
        *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
        '--aptopt=Acquire::Languages "none"',
        "--skip=essential/unlink",
        *hooks,
        SUITE,
        str(root),
        str(sources),
    ]


def kernel_files(root: Path) -> tuple[Path, Path]:
    """(vmlinuz, initrd.img) the kernel package and initramfs-tools installed."""
    found = []
    for link in ("/vmlinuz", "/initrd.img"):
        path = in_root(root, link)
        if not path.is_file():
            raise HostError(f"Debian guest image: no {link} after the install")
        found.append(path)
    return found[0], found[1]


def customise(root: Path, key: str) -> None:
    write_into(root, INIT_PATH, INIT_SCRIPT.read_bytes(), 0o755)
    write_into(root, "/etc/hostname", b"densitylab-guest\n", 0o644)
    write_into(root, "/etc/fstab", b"/dev/vda / ext4 rw,relatime 0 1\n", 0o644)
    write_into(root, "/etc/densitylab/image-key", f"{key}\n".encode(), 0o644)


def assemble(inputs: DebianInputs, key: str, work: Path, debs: Path) -> dict[str, object]:
    """Build into work/out; returns the manifest (without the total build time)."""
    root, out = work / "root", work / "out"
    out.mkdir()
    debs.mkdir(parents=True, exist_ok=True)
    t0_ns = time.monotonic_ns()
    run_in_group(mmdebstrap_argv(root, apt_sources(), debs), out / "mmdebstrap.log",
                 MMDEBSTRAP_TIMEOUT_S)  # fmt: skip
    mmdebstrap_s = (time.monotonic_ns() - t0_ns) / 1e9
    customise(root, key)
    vmlinuz, initrd = kernel_files(root)
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    shutil.copyfile(initrd, out / "initrd.img")
    size_mib = image_size_mib(tree_bytes(root), inputs.free_space_mib)
    t1_ns = time.monotonic_ns()
    make_ext4(root, out / "rootfs.ext4", size_mib, key)
    mkfs_s = (time.monotonic_ns() - t1_ns) / 1e9
    return {
        "key": key,
        "cmdline": CMDLINE,
        "kernel_release": vmlinuz.name.removeprefix("vmlinuz-"),
        "packages": installed_packages(root),
        "rootfs": {"image_mib": size_mib, "label": LABEL},
        "timings_s": {"mmdebstrap": round(mmdebstrap_s, 3), "mkfs": round(mkfs_s, 3)},
        "artifacts": {
            n: images.artifact_record(out / n) for n in ("rootfs.ext4", "vmlinuz", "initrd.img")
        },
        "inputs": asdict(inputs),
    }


def load_image(directory: Path, *, verify: bool) -> DebianImage | None:
    """The image in directory, or None if incomplete (sizes; with verify, the kernel's
    and initrd's hashes too: the rootfs is ~1 GiB and checked by size)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        artifacts: Mapping[str, Mapping[str, object]] = manifest["artifacts"]
        key, cmdline = str(manifest["key"]), str(manifest["cmdline"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, record in artifacts.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != record.get("size_bytes"):
            return None
        if verify and name != "rootfs.ext4" and sha256_file(path) != record.get("sha256"):
            return None
    return DebianImage(
        directory / "rootfs.ext4",
        directory / "vmlinuz",
        directory / "initrd.img",
        directory / "manifest.json",
        key,
        True,
        cmdline,
    )


def build_debian_image(root: Path | None = None, *, force: bool = False) -> DebianImage:
    """Build the Debian guest image, or reuse the one whose key matches today's inputs.

    Raises HostError (missing packages, no apt sources) or CommandError (a build step
    failed); a failed or interrupted build leaves nothing behind but its log."""
    top = (root or default_root()).resolve()
    debian = top / "debian"
    with images.build_lock(debian):
        inputs = collect_inputs()
        key = inputs.key()
        return images.reuse_or_build(
            debian,
            "Debian guest image",
            key,
            load_image,
            lambda work: assemble(inputs, key, work, top / f"debs-{SUITE}"),
            force=force,
            failure_log="mmdebstrap.log",
        )


def find_debian_image(root: Path | None = None) -> DebianImage:
    """The image `current` points at, without apt or rebuilding. HostError if none."""
    debian = (root or default_root()).resolve() / "debian"
    return images.find_current(debian, load_image, "Debian guest image", BUILD_HINT)


def export_qcow2(image: DebianImage, dest: Path) -> None:
    """The image as one standalone qcow2 (no backing file), as a user's own image would
    be; its kernel and initrd are in it too (/vmlinuz, /initrd.img)."""
    if dest.exists():
        raise UsageError(f"{dest}: exists already")
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        convert_to_qcow2(image.rootfs, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.debimage",
        description="Build (or reuse) the Debian guest image (fleet.image: debian).",
    )
    parser.add_argument("--root", type=Path, default=None, help=f"default ${CACHE_ENV} "
                        f"or {DEFAULT_ROOT}")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    parser.add_argument("--export", type=Path, metavar="QCOW2", help="also write it out as "
                        "a standalone qcow2")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    t0_ns = time.monotonic_ns()
    try:
        image = build_debian_image(args.root, force=args.force)
        if args.export:
            export_qcow2(image, args.export)
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    elapsed_s = (time.monotonic_ns() - t0_ns) / 1e9
    print(
        f"rootfs   {image.rootfs}\nkernel   {image.kernel}\ninitrd   {image.initrd}\n"
        f"manifest {image.manifest}\nkey      {image.key}\n"
        f"cache    {'hit' if image.cache_hit else 'miss (built)'} in {elapsed_s:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
