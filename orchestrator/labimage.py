"""The lab-host image: a Debian trixie root filesystem that boots the kernels under test.

One ext4 image holds a small Debian trixie system (python3 for the host agent, numactl,
util-linux, procps, iproute2, kmod, qemu-guest-agent, initramfs-tools; openssh-server
and what `densitylab lab prepare` installs on a lab machine) with every Debian kernel
of the A/B comparison installed, so Debian's own initramfs-tools builds their initrds
(MODULES=list and a hook that force-loads virtio_pci, virtio_blk, virtio_console and
ext4: ~9 MB each). PID 1 is images/labhost/densitylab-init, not systemd: it mounts
tracefs and cgroup v2 (memory delegated), loads zram, starts sshd when the VM has a
NIC, starts qemu-ga and prints the DENSITYLAB markers on ttyS0. Each kernel's vmlinuz
and initrd are copied next to the image for direct kernel boot:

    images/out/labhost/<key>/{rootfs.ext4, vmlinuz-<release>, initrd.img-<release>,
                              manifest.json}          and images/out/labhost/current -> <key>

The root filesystem comes from mmdebstrap in unshare mode (as root that is a private
mount and pid namespace: a killed build leaves no mount behind) with the private trixie
apt configuration of orchestrator.kernels (never /etc/apt), and .debs cached in
images/cache/debs-trixie/ (synced in and out of the chroot). The ext4 image is made with
`mkfs.ext4 -d`: no loop device, no mount.

The host agent and dlfill are *not* in the image: they change far more often than the
rootfs and would force a ~1 min rebuild each time. They are small (tens of KiB, ~1 MiB
static) and are pushed per boot with guest-file-write (see tests/system/test_labhost.py).

The cache key is sha256 over: the kernels (packages, versions, .deb sha256s), the package
closure apt would install (simulated with the private apt lists), the include list and
options, this file, kernels.py and images/labhost/*, and the versions of mmdebstrap and
e2fsprogs. A build is not byte-reproducible (dpkg stamps install times); the key names
its inputs, the manifest records what was installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator import kbuild, kernels
from orchestrator.errors import CommandError, DensitylabError, HostError, UsageError
from orchestrator.files import sha256_file
from orchestrator.images import (
    DEFAULT_CACHE_ROOT,
    DEFAULT_OUT_ROOT,
    IMAGES_DIR,
    REPO_ROOT,
    artifact_record,
    build_lock,
    find_current,
    host_package_versions,
    reuse_or_build,
    source_digests,
)
from orchestrator.inventory import LAB_PACKAGES
from orchestrator.kernels import KernelArtifact, PrivateApt
from orchestrator.kernelspec import KernelEntry, label_of
from orchestrator.proc import STDERR_TAIL_CHARS, TimeoutExpired, run, spawn_group, stop_group
from orchestrator.qemuparts import cell_cpus

log = logging.getLogger(__name__)

LABHOST_DIR = IMAGES_DIR / "labhost"
INIT_SCRIPT = LABHOST_DIR / "densitylab-init"
INIT_PATH = "/sbin/densitylab-init"
INITRAMFS_CONF = LABHOST_DIR / "initramfs-tools" / "conf.d" / "densitylab"
INITRAMFS_HOOK = LABHOST_DIR / "initramfs-tools" / "hooks" / "densitylab"
SOURCE_FILES = (
    Path(__file__).resolve(),
    Path(kernels.__file__).resolve(),
    INIT_SCRIPT,
    INITRAMFS_CONF,
    INITRAMFS_HOOK,
)
SUITE = "trixie"
VARIANT = "apt"  # Essential: yes + apt; everything else is named below
BASE_INCLUDES = (
    "python3",  # the host agent
    "numactl",  # numactl, migratepages
    "util-linux",  # zramctl, swapon, mkswap
    "mount",
    "kmod",
    "procps",
    "iproute2",
    "qemu-guest-agent",
    "initramfs-tools",
    "zstd",  # initramfs compression (only a Recommends of initramfs-tools)
    "e2fsprogs",
)
# A lab host also stands in for a real lab machine reached over SSH (orchestrator/
# inventory.py): sshd, kexec, and everything `lab prepare` installs, so that its apt
# step is a no-op in a VM without network. Each package once, in this order.
INCLUDES = tuple(dict.fromkeys((*BASE_INCLUDES, "openssh-server", *LAB_PACKAGES)))
# bpftrace drags in LLVM and clang (~260 MB installed): off unless asked for.
BPFTRACE = ("bpftrace",)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
HOST_PACKAGES = ("mmdebstrap", "e2fsprogs", "apt", "dpkg")
DEFAULT_KERNELS = ("6.12", "7.3")
CMDLINE = f"root=/dev/vda rw console=ttyS0 init={INIT_PATH} quiet panic=-1"
FREE_SPACE_MIB = 1024  # room inside the guest for logs, traces, swap files
LABEL = "densitylab"
BUILD_HINT = "run `make lab-images` (python -m orchestrator.labimage)"
MMDEBSTRAP_TIMEOUT_S = 1200


@dataclass(frozen=True)
class LabKernel:
    """One bootable kernel of the image; paths are absolute."""

    label: str
    release: str
    vmlinuz: Path
    initrd: Path | None  # None: a built kernel with everything it needs built in
    origin: str


@dataclass(frozen=True)
class LabImage:
    rootfs: Path
    kernels: tuple[LabKernel, ...]
    manifest: Path
    key: str
    cache_hit: bool
    cmdline: str = CMDLINE

    def kernel(self, label_or_release: str) -> LabKernel:
        """The kernel with this label ("6.12") or release; UsageError if there is none."""
        for k in self.kernels:
            if label_or_release in (k.label, k.release):
                return k
        have = ", ".join(f"{k.label} ({k.release})" for k in self.kernels)
        raise UsageError(f"lab image {self.key[:12]} has no kernel {label_or_release!r}: {have}")


@dataclass(frozen=True)
class LabInputs:
    """Everything the image depends on; its key names the output directory."""

    kernels: tuple[dict[str, object], ...]  # label, release, packages, pins
    includes: tuple[str, ...]
    variant: str
    dpkg_options: tuple[str, ...]
    closure: dict[str, str]  # package -> version apt would install (simulated)
    host_packages: dict[str, str]
    sources: dict[str, str]  # repo-relative path -> sha256
    free_space_mib: int

    def key(self) -> str:
        """sha256 over a canonical JSON rendering (dict order does not matter)."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- inputs (no build)


def kernel_input(k: KernelArtifact) -> dict[str, object]:
    """What of a kernel goes into the key: its identity, not where it is cached."""
    return {
        "label": k.label,
        "release": k.release,
        "packages": {p.name: [p.version, p.sha256] for p in k.packages},
        "pins": {p.name: [p.version, p.sha256] for p in k.pins},
    }


def install_list(ks: Sequence[KernelArtifact], includes: Sequence[str]) -> list[str]:
    """apt arguments: the includes, pinned generic packages, each kernel's image package."""
    pins: dict[str, str] = {}
    for k in ks:
        for p in k.pins:
            if pins.setdefault(p.name, p.version) != p.version:
                raise UsageError(f"kernels need different versions of {p.name}")
    images = [k.packages_by_name()[f"linux-image-{k.release}"] for k in ks]
    return [*includes, *(f"{n}={v}" for n, v in sorted(pins.items())), *(p.pin for p in images)]


def parse_simulation(text: str) -> dict[str, str]:
    """`apt-get -s install` output -> {package: version} of the `Inst` lines."""
    out = {}
    for line in text.splitlines():
        if m := re.match(r"Inst (\S+) (?:\[\S+\] )?\((\S+) ", line):
            out[m[1]] = m[2]
    return out


def simulate_closure(apt: PrivateApt, packages: Sequence[str]) -> dict[str, str]:
    """Every package (and version) an install of the essential set plus packages would
    bring, as the private apt sees it (its dpkg status is empty: a fresh system)."""
    cp = apt.run(
        ["apt-get", "-s", "-q", "install", "--no-install-recommends", "?essential", "apt",
         *packages],
        timeout_s=300,
    )  # fmt: skip
    closure = parse_simulation(cp.stdout)
    if not closure:
        raise HostError("apt-get -s install (private apt) planned no packages")
    return closure


def collect_inputs(
    ks: Sequence[KernelArtifact],
    apt: PrivateApt,
    *,
    with_bpftrace: bool = False,
    free_space_mib: int = FREE_SPACE_MIB,
) -> LabInputs:
    includes = (*INCLUDES, *(BPFTRACE if with_bpftrace else ()))
    return LabInputs(
        kernels=tuple(kernel_input(k) for k in ks),
        includes=includes,
        variant=VARIANT,
        dpkg_options=DPKG_OPTIONS,
        closure=simulate_closure(apt, install_list(ks, includes)),
        host_packages=host_package_versions(HOST_PACKAGES),
        sources=source_digests(SOURCE_FILES, REPO_ROOT),
        free_space_mib=free_space_mib,
    )


# ---------------------------------------------------------------- the root filesystem


def mmdebstrap_argv(root: Path, sources: Path, debs: Path, packages: Sequence[str]) -> list[str]:
    """The mmdebstrap command: unshare mode, our sources, the .deb cache synced in and out,
    the initramfs configuration in place before any kernel is installed."""
    q = shlex.quote
    hooks = [
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives'
        ' "$1"/etc/initramfs-tools/conf.d "$1"/etc/initramfs-tools/hooks',
        f"--setup-hook=sync-in {q(str(debs))} /var/cache/apt/archives/",
        f"--setup-hook=copy-in {q(str(INITRAMFS_CONF))} /etc/initramfs-tools/conf.d/",
        f"--setup-hook=copy-in {q(str(INITRAMFS_HOOK))} /etc/initramfs-tools/hooks/",
        f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs))}",
    ]
    return [
        "mmdebstrap",
        "--mode=unshare",
        f"--variant={VARIANT}",
        "--format=directory",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
        '--aptopt=Acquire::Languages "none"',
        # keep what the download step fetched, so sync-out can cache it
        "--skip=essential/unlink",
        *hooks,
        SUITE,
        str(root),
        str(sources),
    ]


def installed_packages(root: Path) -> dict[str, str]:
    cp = run(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f",
         "${Package}\t${Version}\t${db:Status-Abbrev}\n"],
        timeout_s=60,
    )  # fmt: skip
    out = {}
    for line in cp.stdout.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status.startswith("ii"):
            out[name] = version
    return out


def closure_drift(simulated: Mapping[str, str], installed: Mapping[str, str]) -> dict[str, object]:
    """How the real install differs from the simulation the key was computed from."""
    return {
        "only_simulated": sorted(set(simulated) - set(installed)),
        "only_installed": sorted(set(installed) - set(simulated)),
        "version_differs": sorted(
            n for n in set(simulated) & set(installed) if simulated[n] != installed[n]
        ),
    }


def write_into(root: Path, path: str, data: bytes, mode: int) -> None:
    """Write a file at path as the guest sees it (/sbin is a symlink to usr/sbin)."""
    dest = in_root(root, path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    dest.chmod(mode)


def customise(root: Path, key: str) -> None:
    """Our init, identity and an fstab. systemd's files are there (udev, which
    initramfs-tools needs, depends on them) but it never runs: PID 1 is our init."""
    write_into(root, INIT_PATH, INIT_SCRIPT.read_bytes(), 0o755)
    write_into(root, "/etc/hostname", b"densitylab-labhost\n", 0o644)
    write_into(root, "/etc/fstab", b"/dev/vda / ext4 rw,relatime 0 1\n", 0o644)
    write_into(root, "/etc/densitylab/image-key", f"{key}\n".encode(), 0o644)
    (root / "opt" / "densitylab").mkdir(parents=True, exist_ok=True)


def in_root(root: Path, path: str) -> Path:
    """path inside the tree root, following symlinks as the guest would (not the host)."""
    cur = root
    parts = list(Path(path.lstrip("/")).parts)
    for _ in range(64):
        if not parts:
            return cur
        nxt = cur / parts.pop(0)
        if nxt.is_symlink():
            target = os.readlink(nxt)
            base = root if target.startswith("/") else cur
            parts = [*Path(target.lstrip("/")).parts, *parts]
            cur = base
        else:
            cur = nxt
    raise HostError(f"{path}: too many symlinks inside {root}")


def boot_files(root: Path, release: str) -> tuple[Path, Path]:
    """(vmlinuz, initrd) of an installed kernel, wherever its packages put them."""
    vmlinuz = [f"/boot/vmlinuz-{release}", f"/usr/lib/modules/{release}/vmlinuz"]
    initrd = [f"/boot/initrd.img-{release}", f"/usr/lib/modules/{release}/initrd.img"]
    found = []
    for what, candidates in (("vmlinuz", vmlinuz), ("initrd", initrd)):
        paths = [p for c in candidates if (p := in_root(root, c)).is_file()]
        if not paths:
            raise HostError(f"kernel {release}: no {what} in the root filesystem")
        found.append(paths[0])
    return found[0], found[1]


def tree_bytes(root: Path) -> int:
    """Allocated bytes of a tree (hard links once): what mkfs.ext4 -d has to store."""
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def image_size_mib(content_bytes: int, free_space_mib: int) -> int:
    """Content + 15% for ext4 metadata and inode tables + free space, in 64 MiB steps."""
    mib = content_bytes * 1.15 / 2**20 + free_space_mib
    return int(-(-mib // 64) * 64)


def make_ext4(root: Path, image: Path, size_mib: int, key: str) -> None:
    """mkfs.ext4 -d: the tree becomes a (sparse) filesystem image without a mount."""
    fs_uuid = str(uuid.UUID(key[:32]))  # stable per key, so the image names its inputs
    with image.open("wb") as f:
        f.truncate(size_mib * 2**20)
    run(
        ["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", LABEL, "-U", fs_uuid,
         "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", root, image],
        timeout_s=600,
    )  # fmt: skip


def run_in_group(argv: Sequence[str], log_path: Path, timeout_s: float) -> None:
    """Run a long build step in its own process group, output to log_path.

    proc.run would kill only mmdebstrap itself on a timeout; its apt and dpkg children
    live on in their pid namespace. Here the whole group goes, on a timeout and on any
    exception (Ctrl-C included). Raises CommandError with the log's tail.
    """
    with log_path.open("wb") as log_file:
        try:
            child = spawn_group(argv, stdout=log_file.fileno(), stderr=log_file.fileno())
        except FileNotFoundError as e:
            raise CommandError(list(argv), 127, str(e)) from e
    try:
        rc = child.wait(timeout=timeout_s)
    except BaseException as e:
        stop_group(child)
        timed_out = isinstance(e, TimeoutExpired)
        tail = log_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
        if timed_out:
            raise CommandError(list(argv), None, tail, timed_out=True) from e
        raise
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
        raise CommandError(list(argv), rc, tail)


# ---------------------------------------------------------------- build, cache, publish


def assemble(
    inputs: LabInputs,
    ks: Sequence[KernelArtifact],
    apt: PrivateApt,
    key: str,
    work: Path,
    cache_root: Path,
) -> dict[str, object]:
    """Build into work/out; returns the manifest (without the total build time)."""
    root, out = work / "root", work / "out"
    out.mkdir()
    debs = cache_root / kernels.DEBS_DIRNAME
    debs.mkdir(parents=True, exist_ok=True)
    apt.ensure()
    argv = mmdebstrap_argv(root, apt.sources_file, debs, install_list(ks, inputs.includes))
    t0_ns = time.monotonic_ns()
    run_in_group(argv, out / "mmdebstrap.log", MMDEBSTRAP_TIMEOUT_S)
    mmdebstrap_s = (time.monotonic_ns() - t0_ns) / 1e9
    customise(root, key)
    installed = installed_packages(root)
    drift = closure_drift(inputs.closure, installed)
    if any(drift.values()):
        log.warning("installed packages differ from the simulated closure: %s", drift)
    boot: list[dict[str, object]] = []
    for k in ks:
        vmlinuz, initrd = boot_files(root, k.release)
        if sha256_file(vmlinuz) != k.vmlinuz_sha256:
            raise HostError(f"kernel {k.release}: installed vmlinuz differs from the .deb's")
        shutil.copyfile(vmlinuz, out / f"vmlinuz-{k.release}")
        shutil.copyfile(initrd, out / f"initrd.img-{k.release}")
        boot.append({**k.record(), "initrd_in_image": str(initrd.relative_to(root))})
    content = tree_bytes(root)
    size_mib = image_size_mib(content, inputs.free_space_mib)
    t1_ns = time.monotonic_ns()
    make_ext4(root, out / "rootfs.ext4", size_mib, key)
    mkfs_s = (time.monotonic_ns() - t1_ns) / 1e9
    names = ["rootfs.ext4", *(f"{p}-{k.release}" for k in ks for p in ("vmlinuz", "initrd.img"))]
    return {
        "key": key,
        "cmdline": CMDLINE,
        "kernels": boot,
        "packages": installed,
        "closure_drift": drift,
        "rootfs": {
            "content_bytes": content,
            "image_mib": size_mib,
            "allocated_bytes": (out / "rootfs.ext4").stat().st_blocks * 512,
            "label": LABEL,
        },
        "timings_s": {"mmdebstrap": round(mmdebstrap_s, 3), "mkfs": round(mkfs_s, 3)},
        "artifacts": {n: artifact_record(out / n) for n in names},
        "inputs": asdict(inputs),
    }


def load_image(directory: Path, *, verify: bool, deep: bool = False) -> LabImage | None:
    """The image in directory, or None if incomplete or not matching its manifest.

    verify checks sizes, and sha256 of everything but the rootfs (1+ GiB: ~3 s to hash);
    deep hashes the rootfs too.
    """
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        artifacts: Mapping[str, Mapping[str, object]] = manifest["artifacts"]
        lab_kernels = tuple(
            LabKernel(
                str(k["label"]),
                str(k["release"]),
                directory / f"vmlinuz-{k['release']}",
                directory / f"initrd.img-{k['release']}",
                str(k["origin"]),
            )
            for k in manifest["kernels"]
        )
        key, cmdline = str(manifest["key"]), str(manifest["cmdline"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, record in artifacts.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != record.get("size_bytes"):
            return None
        hash_it = verify and (deep or name != "rootfs.ext4")
        if hash_it and sha256_file(path) != record.get("sha256"):
            return None
    return LabImage(
        directory / "rootfs.ext4", lab_kernels, directory / "manifest.json", key, True, cmdline
    )


def build_lab_image(
    kernel_specs: Sequence[str] = DEFAULT_KERNELS,
    *,
    out_root: Path = DEFAULT_OUT_ROOT,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    force: bool = False,
    refresh: bool = False,
    with_bpftrace: bool = False,
) -> LabImage:
    """Build the lab-host image with these Debian kernels, or reuse the matching one.

    Raises UsageError (bad or local kernel specs), HostError (missing packages, kernel
    lacking an option, apt trouble) or CommandError (a build step failed).
    """
    specs = [kernels.parse_kernel_spec(s) for s in kernel_specs]
    if not specs or any(s.bzimage is not None for s in specs):
        raise UsageError(
            "lab images install Debian kernels only; boot a local bzImage directly with the "
            "rootfs (kernels.fetch_kernel('file:...') and qemu_argv)"
        )
    out_root, cache_root = out_root.resolve(), cache_root.resolve()
    labhost = out_root / "labhost"
    apt = kernels.private_apt(cache_root)
    with build_lock(labhost):
        ks = [
            kernels.fetch_kernel(s, cache_root=cache_root, apt=apt, refresh=refresh) for s in specs
        ]
        if len({k.release for k in ks}) != len(ks):
            raise UsageError(f"kernel specs {kernel_specs} name the same kernel twice")
        inputs = collect_inputs(ks, apt, with_bpftrace=with_bpftrace)
        key = inputs.key()
        return reuse_or_build(
            labhost,
            "lab image",
            key,
            load_image,
            lambda work: assemble(inputs, ks, apt, key, work, cache_root),
            force=force,
            detail=f" (kernels {[k.release for k in ks]})",
        )


def resolve_kernel(image: LabImage, entry: KernelEntry) -> LabKernel:
    """What a lab host boots for a spec's kernel entry: a kernel of the image by label,
    or one built from source (the kbuild cache), a built tree, or a bindeb-pkg .deb;
    those boot the image's rootfs without an initramfs (everything built in).

    Raises UsageError (no such kernel in the image, bad paths) or HostError (a source
    kernel not built yet)."""
    b = kbuild.bootable(entry)
    if b is None:
        return image.kernel(label_of(entry))
    return LabKernel(b.label, b.release, b.vmlinuz, b.initrd, b.origin)


def find_lab_image(out_root: Path = DEFAULT_OUT_ROOT) -> LabImage:
    """The image `current` points at, without apt, rebuilding or hashing.

    Raises HostError with a hint to build it when there is none.
    """
    return find_current(out_root.resolve() / "labhost", load_image, "lab-host image", BUILD_HINT)


# ---------------------------------------------------------------- booting it


@dataclass(frozen=True)
class BootPlan:
    """One boot of a lab host under plain QEMU (the libvirt path belongs to the fleet)."""

    image: LabImage
    kernel: LabKernel
    overlay: Path
    agent_socket: Path
    vcpus: int = 2
    memory_mib: int = 4096
    numa_nodes: int = 2
    accel: str = "tcg"  # KVM-PVM hosts cannot run normal kernels: see LAB-NOTES
    cpu: str = "max"
    extra_cmdline: str = ""


def machine_args(plan: BootPlan) -> list[str]:
    accel = "tcg,thread=multi" if plan.accel == "tcg" else plan.accel
    return ["-accel", accel, "-cpu", plan.cpu, "-smp", str(plan.vcpus),
            "-m", f"{plan.memory_mib}M", "-nographic", "-nodefaults", "-no-reboot",
            "-serial", "stdio", "-nic", "none"]  # fmt: skip


def numa_args(plan: BootPlan) -> list[str]:
    """Equal NUMA cells, each with its own RAM backend and an equal block of vCPUs."""
    n = plan.numa_nodes
    if n < 1 or plan.memory_mib % n:
        raise UsageError(f"{n} NUMA nodes need memory divisible by {n}")
    args: list[str] = []
    for node, cpus in enumerate(cell_cpus(plan.vcpus, n)):  # UsageError: vCPUs do not split
        args += ["-object", f"memory-backend-ram,size={plan.memory_mib // n}M,id=m{node}"]
        args += ["-numa", f"node,nodeid={node},cpus={cpus},memdev=m{node}"]
    return args


def kernel_args(plan: BootPlan) -> list[str]:
    cmdline = " ".join(filter(None, [plan.image.cmdline, plan.extra_cmdline]))
    initrd = [] if plan.kernel.initrd is None else ["-initrd", str(plan.kernel.initrd)]
    return ["-kernel", str(plan.kernel.vmlinuz), *initrd, "-append", cmdline]


def disk_args(plan: BootPlan) -> list[str]:
    # cache=unsafe: the overlay is thrown away after the boot; flushes only cost time
    return ["-drive", f"file={plan.overlay},format=qcow2,if=virtio,cache=unsafe"]


def agent_args(plan: BootPlan) -> list[str]:
    return ["-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={plan.agent_socket},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]  # fmt: skip


def qemu_argv(plan: BootPlan) -> list[str]:
    """The whole QEMU command line; the serial console is QEMU's stdout."""
    return ["qemu-system-x86_64", *machine_args(plan), *numa_args(plan), *kernel_args(plan),
            *disk_args(plan), *agent_args(plan)]  # fmt: skip


def describe(image: LabImage) -> str:
    lines = [f"key      {image.key}", f"rootfs   {image.rootfs}"]
    for k in image.kernels:
        lines.append(f"kernel   {k.label:6} {k.release}  ({k.origin})")
        lines += [f"         {k.vmlinuz}", f"         {k.initrd or '(no initrd)'}"]
    lines += [f"cmdline  {image.cmdline}", f"manifest {image.manifest}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.labimage",
        description="Build (or reuse) the lab-host image with the kernels under test.",
    )
    parser.add_argument("kernels", nargs="*", default=list(DEFAULT_KERNELS))
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT)
    parser.add_argument("--cache-root", type=Path, default=DEFAULT_CACHE_ROOT)
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    parser.add_argument("--refresh", action="store_true", help="apt-get update (private) first")
    parser.add_argument("--bpftrace", action="store_true", help="add bpftrace (~260 MB)")
    parser.add_argument("--find", action="store_true", help="print the current image only")
    parser.add_argument("--verify", action="store_true", help="with --find: hash everything")
    parser.add_argument(
        "--show-command", metavar="KERNEL", help="print the QEMU command that boots KERNEL"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    t0_ns = time.monotonic_ns()
    try:
        if args.find or args.show_command:
            image = find_lab_image(args.out_root)
            if args.verify and load_image(image.rootfs.parent, verify=True, deep=True) is None:
                raise HostError(f"{image.rootfs.parent}: files do not match the manifest")
        else:
            image = build_lab_image(
                args.kernels,
                out_root=args.out_root,
                cache_root=args.cache_root,
                force=args.force,
                refresh=args.refresh,
                with_bpftrace=args.bpftrace,
            )
        if args.show_command:
            kernel = image.kernel(args.show_command)
            plan = BootPlan(image, kernel, Path("OVERLAY.qcow2"), Path("AGENT.sock"))
            print(shlex.join(qemu_argv(plan)))
            return 0
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    elapsed_s = (time.monotonic_ns() - t0_ns) / 1e9
    print(describe(image))
    print(f"cache    {'hit' if image.cache_hit else 'miss (built)'} in {elapsed_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
