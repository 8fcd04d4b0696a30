"""What the fleet's guests boot, from `fleet.image`: the tiny image, the Debian guest
image, or the user's own disk image. Resolved (and every path checked) before the host
is touched, so a wrong path is one line naming the field and nothing has started."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import debimage, images
from orchestrator.errors import UsageError
from orchestrator.files import sha256_file
from orchestrator.spec import ImagePath, Spec


@dataclass(frozen=True)
class GuestBoot:
    """One guest's boot: direct kernel boot (kernel set) or the disk's own bootloader;
    `disk` is the shared backing file each guest overlays. markers: the image's init
    prints the DENSITYLAB console markers (a user's image answers the agent only)."""

    label: str  # tiny, debian, or the path
    kernel: Path | None
    initrd: Path | None
    disk: Path | None
    cmdline: str
    markers: bool
    # an identity for each guest: its name goes on the kernel command line (our init
    # sets the hostname from dl.hostname=)
    hostname_arg: bool = False


def check_file(source: str, field: str, value: str, what: str) -> Path:
    """An existing regular file, or UsageError `source: field: value: why`."""
    path = Path(value)
    if not path.exists():
        raise UsageError(f"{source}: {field}: {value}: no such {what}")
    if not path.is_file():
        raise UsageError(f"{source}: {field}: {value}: not a regular file")
    return path.resolve()


def resolve(spec: Spec, source: str) -> GuestBoot:
    """The spec's guest image; UsageError for a missing file, HostError for an image
    that needs building (with the make target that builds it)."""
    image = spec.fleet.image
    if image == "tiny":
        tiny = images.find_tiny_image()
        return GuestBoot("tiny", tiny.kernel, tiny.initrd, None, images.CMDLINE, True)
    if image == "debian":
        deb = debimage.find_debian_image()
        return GuestBoot("debian", deb.kernel, deb.initrd, deb.rootfs, deb.cmdline, True, True)
    assert isinstance(image, ImagePath)
    disk = check_file(source, "fleet.image.path", image.path, "image file")
    kernel = initrd = None
    if image.kernel is not None:
        kernel = check_file(source, "fleet.image.kernel", image.kernel, "kernel file")
    if image.initrd is not None:
        initrd = check_file(source, "fleet.image.initrd", image.initrd, "initrd file")
    return GuestBoot(image.path, kernel, initrd, disk, image.cmdline, False)


def check_files(spec: Spec, source: str) -> None:
    """Every file the spec names exists: a user's image (and its kernel, initrd) and the
    workload's playbooks. UsageError naming the field otherwise; reads nothing else."""
    image, w = spec.fleet.image, spec.workload
    if isinstance(image, ImagePath):
        for name in ("path", "kernel", "initrd"):
            value = getattr(image, name)
            if value is not None:
                check_file(source, f"fleet.image.{name}", value, f"{name} file".replace(
                    "path file", "image file"))  # fmt: skip
    for name in ("playbook", "load"):
        value = getattr(w, name)
        if value is not None:
            check_file(source, f"workload.{name}", value, "playbook file")


def record(boot: GuestBoot) -> dict[str, Any]:
    """The manifest's record of what the guests booted (the disk by size: GiBs to hash)."""
    out: dict[str, Any] = {"label": boot.label, "cmdline": boot.cmdline}
    for name in ("kernel", "initrd"):
        path = getattr(boot, name)
        if path is not None:
            out[name] = str(path)
            out[f"{name}_sha256"] = sha256_file(path)
    if boot.disk is not None:
        out["disk"] = str(boot.disk)
        out["disk_bytes"] = boot.disk.stat().st_size
    return out
