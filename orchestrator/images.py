"""The tiny guest image: Debian's cloud kernel plus a busybox initramfs, built reproducibly.

The initramfs holds busybox, the few kernel modules a guest needs (virtio PCI and
console, zram and its compressors), the static dlfill workload and qemu-ga with its
shared-library closure, under images/tiny/init as PID 1.

Everything that can change the output goes into a sha256 cache key: this file, the init
script, dlfill's source and Makefile, the kernel package (name, version and the .deb's
sha256 from the apt index), the versions of the host packages and tools whose files or
output we use, and the sha256 of every host file copied in. The key is computed from
metadata and hashes only, so a cache hit downloads and unpacks nothing. A build writes
images/out/tiny/<key>/{vmlinuz,initrd.img,manifest.json} and points `current` at it.

Reproducible by construction: the cpio archive is written here (sorted names, owner
0:0, mtime 0, normalised modes, inode numbers by position) and gzip'd with mtime 0, so
two builds from the same inputs are byte-identical.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from orchestrator.errors import DensitylabError, HostError, UsageError
from orchestrator.files import sha256_file, write_text_atomic
from orchestrator.proc import run

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT / "images"
DEFAULT_OUT_ROOT = IMAGES_DIR / "out"
DEFAULT_CACHE_ROOT = IMAGES_DIR / "cache"
INIT_SCRIPT = IMAGES_DIR / "tiny" / "init"
WORKLOAD_DIR = IMAGES_DIR / "workload"
SOURCE_FILES = (
    Path(__file__).resolve(),
    INIT_SCRIPT,
    WORKLOAD_DIR / "dlfill.c",
    WORKLOAD_DIR / "Makefile",
)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Loaded by the init in this order; their modules.dep dependencies come along. The
# compressors are soft dependencies of zram (it asks for them by crypto alias at run
# time), so modules.dep alone would not bring them in.
GUEST_MODULES = (
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "zram",
    "lzo_rle",
    "lzo",
    "lz4",
    "zstd",
)
BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
# Host packages whose files (busybox, qemu-ga, libs) or output (static dlfill, depmod)
# end up in the image.
HOST_PACKAGES = ("busybox-static", "qemu-guest-agent", "libc6", "libc6-dev", "kmod")
TOOL_VERSION_ARGV = {"gcc": ["gcc", "--version"], "ld": ["ld", "--version"]}
APT_STATE_PATHS = (Path("/var/lib/apt/lists"), Path("/etc/apt"), Path("/var/lib/dpkg/status"))
# no_timer_check: the kernel's IO-APIC timer check counts timer ticks within a short
# window; a TCG vCPU on a loaded host (16 guests booting on 2 cores in `make bench`)
# misses it and panics in apic_intr_mode_init ("IO-APIC + timer doesn't work"), twice
# in a row for one guest. Cloud images set it for the same reason.
CMDLINE = "console=ttyS0 quiet panic=-1 no_timer_check"
BUILD_HINT = "run `make images` (python -m orchestrator.images)"


@dataclass(frozen=True)
class TinyImage:
    """A built image; paths are absolute."""

    kernel: Path
    initrd: Path
    manifest: Path
    key: str
    cache_hit: bool


@dataclass(frozen=True)
class KernelPackage:
    """The concrete kernel package the cloud meta-package resolves to."""

    name: str
    version: str
    deb_sha256: str

    @property
    def release(self) -> str:
        """`uname -r` of this kernel, e.g. 6.1.0-56-cloud-amd64."""
        return self.name.removeprefix("linux-image-")


@dataclass(frozen=True)
class BuildInputs:
    """Everything the image depends on; its key names the output directory."""

    kernel: KernelPackage
    packages: dict[str, str]  # Debian package -> version
    tools: dict[str, str]  # tool -> first line of its --version
    sources: dict[str, str]  # repo-relative path -> sha256
    host_files: dict[str, str]  # absolute path, on the host and in the image -> sha256
    libs: tuple[str, ...]  # qemu-ga's ldd closure: same path on the host and in the image

    def key(self) -> str:
        return cache_key(self)


def cache_key(inputs: BuildInputs) -> str:
    """sha256 over a canonical JSON rendering of the inputs (dict order does not matter)."""
    blob = json.dumps(asdict(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- inputs (no downloads)


def source_digests(paths: Iterable[Path], root: Path = REPO_ROOT) -> dict[str, str]:
    """sha256 of each build source, keyed by its path relative to root."""
    out = {}
    for path in paths:
        if not path.is_file():
            raise UsageError(f"{path}: build source missing")
        out[str(path.relative_to(root))] = sha256_file(path)
    return out


def host_package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions; raises HostError naming what is missing."""
    names = list(packages)
    cp = run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n", *names],
        check=False,
        timeout_s=30,
    )
    found = {}
    for line in cp.stdout.splitlines():
        name, version, status = [*line.split("\t"), "", ""][:3]
        if status.startswith("ii"):
            found[name.split(":")[0]] = version
    missing = sorted(set(names) - set(found))
    if missing:
        raise HostError(
            f"image build needs Debian packages {', '.join(missing)}: "
            f"apt-get install {' '.join(missing)}"
        )
    return found


def tool_versions() -> dict[str, str]:
    return {
        tool: run(argv, timeout_s=30).stdout.splitlines()[0]
        for tool, argv in TOOL_VERSION_ARGV.items()
    } | {"zlib": zlib.ZLIB_RUNTIME_VERSION}


def parse_ldd(text: str) -> tuple[str, ...]:
    """The libraries (and dynamic loader) ldd resolved, as sorted absolute paths.

    The vDSO has no file and is skipped; an unresolved library raises HostError.
    """
    libs = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("linux-vdso") or "statically linked" in line:
            continue
        if m := re.match(r"(\S+) => not found", line):
            raise HostError(f"ldd: {m[1]} not found")
        if not (m := re.match(r"(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$", line)):
            raise HostError(f"ldd: cannot parse {line!r}")
        libs.add(m[1])
    return tuple(sorted(libs))


def shared_library_closure(binary: Path) -> tuple[str, ...]:
    """ldd's view of binary; each library is copied to the same path in the image."""
    return parse_ldd(run(["ldd", binary], timeout_s=30).stdout)


def apt_state_stamp() -> str:
    """A cheap fingerprint of apt's view of the archive: names, sizes, mtimes of its state."""
    h = hashlib.sha256()
    for root in APT_STATE_PATHS:
        paths = sorted(root.rglob("*")) if root.is_dir() else [root]
        for p in paths:
            if p.is_file():
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def query_kernel_package() -> KernelPackage:
    """Ask apt which concrete kernel the cloud meta-package depends on, and its .deb sha256."""
    deps = run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout_s=60, check=False)
    names = re.findall(r"Depends: (linux-image-\S+-cloud-amd64)\b", deps.stdout)
    if deps.returncode != 0 or not names:
        raise HostError(f"apt-cache knows no {KERNEL_META_PACKAGE}: run apt-get update")
    show = run(["apt-cache", "show", "--no-all-versions", names[0]], timeout_s=60).stdout
    fields = dict(re.findall(r"^(Version|SHA256): (\S+)$", show, flags=re.M))
    if set(fields) != {"Version", "SHA256"}:
        raise HostError(f"apt-cache show {names[0]}: no Version/SHA256 fields")
    return KernelPackage(names[0], fields["Version"], fields["SHA256"])


def resolve_kernel_package(cache_root: Path) -> KernelPackage:
    """query_kernel_package, remembered until apt's state changes (apt-cache takes ~1 s)."""
    memo = cache_root / "kernel-resolution.json"
    stamp = apt_state_stamp()
    try:
        saved = json.loads(memo.read_text())
        if saved["apt_state"] == stamp:
            return KernelPackage(**saved["kernel"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    kernel = query_kernel_package()
    write_text_atomic(memo, json.dumps({"apt_state": stamp, "kernel": asdict(kernel)}, indent=1))
    return kernel


def collect_inputs(cache_root: Path) -> BuildInputs:
    """Every input of the build, from metadata and hashes only (no download, no unpack)."""
    libs = shared_library_closure(QEMU_GA)
    host_files = [BUSYBOX, QEMU_GA, *map(Path, libs)]
    return BuildInputs(
        kernel=resolve_kernel_package(cache_root),
        packages=host_package_versions(HOST_PACKAGES),
        tools=tool_versions(),
        sources=source_digests(SOURCE_FILES),
        host_files={str(path): sha256_file(path) for path in host_files},
        libs=libs,
    )


# ---------------------------------------------------------------- kernel and modules


def fetch_kernel_deb(kernel: KernelPackage, cache_root: Path) -> Path:
    """The kernel .deb from images/cache/debs, downloaded once and checked against apt."""
    debs = cache_root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for deb in debs.glob(f"{kernel.name}_*.deb"):
        if sha256_file(deb) == kernel.deb_sha256:
            return deb
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        run(["apt-get", "download", f"{kernel.name}={kernel.version}"], cwd=tmp, timeout_s=600)
        got = list(Path(tmp).glob(f"{kernel.name}_*.deb"))
        if len(got) != 1 or sha256_file(got[0]) != kernel.deb_sha256:
            raise HostError(f"apt-get download {kernel.name}: no .deb matching the apt index")
        dest = debs / got[0].name
        os.replace(got[0], dest)
    return dest


def unpack_kernel(deb: Path, kernel: KernelPackage, dest: Path) -> tuple[Path, Path]:
    """dpkg -x (never install) the kernel; returns (vmlinuz, the tree holding lib/modules)."""
    run(["dpkg", "-x", deb, dest], timeout_s=300)
    vmlinuz = dest / "boot" / f"vmlinuz-{kernel.release}"
    # merged-/usr kernel packages ship usr/lib/modules instead of lib/modules
    trees = [t for t in (dest, dest / "usr") if (t / "lib/modules" / kernel.release).is_dir()]
    if not vmlinuz.is_file() or not trees:
        raise HostError(f"{deb.name}: no boot/vmlinuz-{kernel.release} or lib/modules tree")
    return vmlinuz, trees[0]


def module_name(relpath: str) -> str:
    """kernel/crypto/lzo-rle.ko.xz -> lzo_rle (the name modprobe and modules.builtin use)."""
    base = relpath.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base)
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleSelection:
    files: tuple[str, ...]  # relpaths under lib/modules/<release>, sorted
    builtin: tuple[str, ...]  # wanted names the kernel has built in


def select_modules(
    modules_dep: str, modules_builtin: str, wanted: Iterable[str]
) -> ModuleSelection:
    """The module files needed for wanted names, with their dependencies (from modules.dep).

    Built-in modules need no file. Raises HostError for a name the kernel lacks.
    """
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        if ":" in line:
            path, rest = line.split(":", 1)
            deps[module_name(path)] = [path, *rest.split()]
    builtin = {module_name(p) for p in modules_builtin.split()}
    files: set[str] = set()
    built_in: list[str] = []
    for name in wanted:
        name = name.replace("-", "_")
        if name in builtin:
            built_in.append(name)
        elif name in deps:
            files.update(deps[name])
        else:
            raise HostError(f"kernel has no module {name} (neither modules.dep nor .builtin)")
    return ModuleSelection(tuple(sorted(files)), tuple(built_in))


def read_module_file(path: Path, scratch: Path) -> bytes:
    """Module bytes, decompressed: busybox modprobe cannot be trusted with .ko.xz/.ko.zst."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":  # no zstd in the 3.11 stdlib
        out = scratch / (path.name + ".raw")
        run(["zstd", "-d", "-q", "-f", "-o", out, path], timeout_s=60)
        return out.read_bytes()
    return path.read_bytes()


def stage_modules(kernel_tree: Path, release: str, root: Path, scratch: Path) -> ModuleSelection:
    """Copy the selected modules into root and run depmod there, as modprobe expects."""
    src = kernel_tree / "lib" / "modules" / release
    # The .deb ships no modules.dep (the installer makes it): make one to read deps from.
    run(["depmod", "-b", kernel_tree, release], timeout_s=120)
    selection = select_modules(
        (src / "modules.dep").read_text(), (src / "modules.builtin").read_text(), GUEST_MODULES
    )
    dst = root / "lib" / "modules" / release
    for rel in selection.files:
        plain = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", rel)
        write_file(dst / plain, read_module_file(src / rel, scratch), 0o644)
    for meta in ("modules.builtin", "modules.builtin.modinfo"):
        if (src / meta).is_file():
            write_file(dst / meta, (src / meta).read_bytes(), 0o644)
    # depmod orders modules.dep by modules.order: keep the kernel's order, our modules only.
    names = {module_name(rel) for rel in selection.files}
    order = [
        line
        for line in (src / "modules.order").read_text().splitlines()
        if module_name(line) in names
    ]
    write_file(dst / "modules.order", "".join(f"{line}\n" for line in order).encode(), 0o644)
    run(["depmod", "-b", root, release], timeout_s=120)
    return selection


# ---------------------------------------------------------------- the initramfs tree


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def copy_verified(src: Path, dest: Path, want_sha256: str) -> None:
    """Copy a host file whose hash went into the key; refuse if it changed since."""
    data = src.read_bytes()
    if hashlib.sha256(data).hexdigest() != want_sha256:
        raise HostError(f"{src} changed during the image build; run it again")
    write_file(dest, data, 0o755 if src.stat().st_mode & 0o111 else 0o644)


def stage_userland(root: Path, inputs: BuildInputs, dlfill: Path, key: str) -> None:
    """busybox and its applets, dlfill, qemu-ga and its libraries, /init and /etc."""
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "var", "etc/densitylab", "lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "var" / "run").symlink_to("../run")  # qemu-ga and friends look in /var/run
    # busybox, qemu-ga and its libraries go to the same paths they have on the host
    for path, digest in inputs.host_files.items():
        copy_verified(Path(path), root / path.lstrip("/"), digest)
    for applet in run([BUSYBOX, "--list-full"], timeout_s=30).stdout.split():
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(BUSYBOX)
    write_file(root / "usr" / "bin" / "dlfill", dlfill.read_bytes(), 0o755)
    write_file(root / "init", INIT_SCRIPT.read_bytes(), 0o755)
    write_file(root / "etc" / "passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    write_file(root / "etc" / "group", b"root:x:0:\n", 0o644)
    write_file(root / "etc" / "densitylab" / "image-key", f"{key}\n".encode(), 0o644)


def host_dlfill() -> Path:
    """The in-tree dlfill for host-side workloads (and lab hosts), made (or brought up
    to date with its source) by make: cheap when it is current."""
    run(["make", "-s", "-C", WORKLOAD_DIR], timeout_s=300)
    return Path(WORKLOAD_DIR) / "dlfill"


def fragmented_copy_argv(
    dlfill: str, mib: int, vmas: int, seed: int, instance: int, *, one_content: bool = False
) -> list[str]:
    """dlfill holding `mib` of pages shared with every copy of the same seed, split into
    `vmas` VMAs of one anon_vma: the shape the old rmap_walk_ksm is slow on.

    one_content: every page holds one content, so the copies merge into a few KSM pages
    of up to max_page_sharing mappings each (the published rmap_walk_ksm benchmark)."""
    return [
        dlfill, "--mib", str(mib), "--dup", "1", "--mergeable", "--fragment", str(vmas),
        "--seed", str(seed), "--instance", str(instance), "--hold",
        *(["--one-content"] if one_content else []),
    ]  # fmt: skip


def build_dlfill(scratch: Path) -> Path:
    """A fresh static dlfill in scratch (never the developer's in-tree binary)."""
    out = scratch / "dlfill-build"
    run(["make", "-C", WORKLOAD_DIR, f"BUILD_DIR={out}"], timeout_s=300)
    return out / "dlfill"


# ---------------------------------------------------------------- cpio newc + gzip


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, no leading slash
    mode: int  # full st_mode: type and permission bits
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # device nodes only


# Modes the kernel's unpacker applies as-is; everything else is normalised from the tree.
MODE_OVERRIDES = {"tmp": stat.S_IFDIR | 0o1777, "root": stat.S_IFDIR | 0o700}
SPECIAL_ENTRIES = (
    # The kernel opens /dev/console for init's stdio before our devtmpfs is mounted.
    CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
)


def tree_entries(root: Path) -> list[CpioEntry]:
    """The tree as cpio entries with normalised modes (umask and host perms do not leak)."""
    entries = []
    for path in root.rglob("*"):
        name = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entry = CpioEntry(name, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            entry = CpioEntry(name, stat.S_IFDIR | 0o755)
        elif stat.S_ISREG(st.st_mode):
            perm = 0o755 if st.st_mode & 0o111 else 0o644
            entry = CpioEntry(name, stat.S_IFREG | perm, path.read_bytes())
        else:
            raise HostError(f"{path}: unexpected file type in the initramfs tree")
        entries.append(
            CpioEntry(name, MODE_OVERRIDES[name], entry.data) if name in MODE_OVERRIDES else entry
        )
    return entries


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """A cpio 'newc' archive: sorted names (parents first), owner 0:0, mtime 0."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def header(ino: int, e: CpioEntry) -> None:
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad4()

    for ino, e in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        header(ino, e)
        out.extend(e.data)
        pad4()
    header(0, CpioEntry("TRAILER!!!", 0))
    return bytes(out)


def make_initrd(root: Path) -> bytes:
    """gzip'd newc archive of root; gzip mtime 0 and no file name, like gzip -n."""
    archive = write_newc([*tree_entries(root), *SPECIAL_ENTRIES])
    return gzip.compress(archive, compresslevel=9, mtime=0)


# ---------------------------------------------------------------- build, cache, publish


@contextmanager
def build_lock(kind_dir: Path) -> Iterator[None]:
    """One builder per output root: a second one waits, then finds a cache hit.

    kind_dir is made if missing."""
    kind_dir.mkdir(parents=True, exist_ok=True)
    with (kind_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def artifact_record(path: Path) -> dict[str, object]:
    return {"sha256": sha256_file(path), "size_bytes": path.stat().st_size}


def load_image(directory: Path, *, verify: bool) -> TinyImage | None:
    """The image in directory, or None if incomplete (or, with verify, not matching its hashes)."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        artifacts: Mapping[str, Mapping[str, object]] = manifest["artifacts"]
        key = str(manifest["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, record in artifacts.items():
        path = directory / name
        if not path.is_file() or (verify and artifact_record(path) != dict(record)):
            return None
    return TinyImage(
        directory / "vmlinuz",
        directory / "initrd.img",
        directory / "manifest.json",
        key,
        cache_hit=True,
    )


def assemble(inputs: BuildInputs, key: str, work: Path, cache_root: Path) -> dict[str, object]:
    """Build vmlinuz and initrd.img into work/out; returns the manifest (without timing)."""
    kernel = inputs.kernel
    deb = fetch_kernel_deb(kernel, cache_root)
    vmlinuz, kernel_tree = unpack_kernel(deb, kernel, work / "kernel")
    root = work / "root"
    root.mkdir()
    selection = stage_modules(kernel_tree, kernel.release, root, work)
    load = [m for m in GUEST_MODULES if m not in selection.builtin]
    write_file(
        root / "etc" / "densitylab" / "modules", "".join(f"{m}\n" for m in load).encode(), 0o644
    )
    stage_userland(root, inputs, build_dlfill(work), key)
    out = work / "out"
    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    (out / "initrd.img").write_bytes(make_initrd(root))
    return {
        "key": key,
        "kernel": {
            "package": kernel.name,
            "version": kernel.version,
            "release": kernel.release,
            "deb_sha256": kernel.deb_sha256,
        },
        "packages": inputs.packages,
        "qemu_ga_version": inputs.packages["qemu-guest-agent"],
        "modules": {
            "load": load,
            "builtin": list(selection.builtin),
            "files": list(selection.files),
        },
        "cmdline": CMDLINE,
        "artifacts": {name: artifact_record(out / name) for name in ("vmlinuz", "initrd.img")},
        "inputs": asdict(inputs),
    }


def publish(staged: Path, final: Path) -> None:
    """Move a finished build into place; a forced rebuild replaces the old one."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    else:
        os.rename(staged, final)


def point_current(tiny: Path, key: str) -> None:
    link = tiny / f".current.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(key)
    os.replace(link, tiny / "current")


# An image type (TinyImage, LabImage, DebianImage): a dataclass with key and cache_hit.
ImageT = TypeVar("ImageT", bound="DataclassInstance")
ImageT_co = TypeVar("ImageT_co", bound="DataclassInstance", covariant=True)


class ImageLoader(Protocol[ImageT_co]):
    """A kind's load_image: None when directory holds no complete image."""

    def __call__(self, directory: Path, *, verify: bool) -> ImageT_co | None: ...


def reuse_or_build(
    kind_dir: Path,
    what: str,
    key: str,
    load: ImageLoader[ImageT],
    assemble: Callable[[Path], dict[str, object]],
    *,
    force: bool = False,
    failure_log: str | None = None,
    detail: str = "",
) -> ImageT:
    """The image kind_dir/<key> if it verifies, else assemble(work) builds it; either way
    kind_dir/current then points at it. Call with build_lock(kind_dir) held.

    assemble writes the artifacts to work/out and returns the manifest; build_s (seconds)
    is added here. failure_log: a file of work/out kept as kind_dir/last-failed-build.log
    when assemble raises (the scratch folder goes). what names the kind in logs and errors,
    detail is added to the "building" line. Raises what assemble raises, or HostError if
    the new image does not load.
    """
    final = kind_dir / key
    if not force and (image := load(final, verify=True)) is not None:
        log.info("%s %s: cache hit", what, key[:12])
        point_current(kind_dir, key)
        return image
    log.info("%s %s: building%s", what, key[:12], detail)
    t0_ns = time.monotonic_ns()
    with tempfile.TemporaryDirectory(dir=kind_dir, prefix=f".build-{key[:12]}-") as tmp:
        out = Path(tmp) / "out"
        try:
            manifest = assemble(Path(tmp))
        except BaseException:
            if failure_log is not None and (out / failure_log).is_file():
                shutil.copyfile(out / failure_log, kind_dir / "last-failed-build.log")
            raise
        manifest["build_s"] = round((time.monotonic_ns() - t0_ns) / 1e9, 3)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        publish(out, final)
    point_current(kind_dir, key)
    built = load(final, verify=False)
    if built is None:
        raise HostError(f"{final}: {what} incomplete right after building it")
    return replace(built, cache_hit=False)


def find_current(kind_dir: Path, load: ImageLoader[ImageT], what: str, hint: str) -> ImageT:
    """The image kind_dir/current points at, loaded without hashing; HostError naming
    what is missing and the hint to build it when there is none."""
    current = kind_dir / "current"
    image = load(current.resolve(), verify=False) if current.is_symlink() else None
    if image is None:
        raise HostError(f"no {what} in {kind_dir}: {hint}")
    return image


def build_tiny_image(
    out_root: Path = DEFAULT_OUT_ROOT, force: bool = False, *, cache_root: Path = DEFAULT_CACHE_ROOT
) -> TinyImage:
    """Build the tiny guest image, or reuse the one whose key matches today's inputs.

    Writes out_root/tiny/<key>/{vmlinuz,initrd.img,manifest.json} and out_root/tiny/current.
    Raises HostError (missing packages, apt trouble) or CommandError (a build step failed).
    """
    tiny = out_root.resolve() / "tiny"
    with build_lock(tiny):
        inputs = collect_inputs(cache_root)
        key = inputs.key()
        return reuse_or_build(
            tiny,
            "tiny image",
            key,
            load_image,
            lambda work: assemble(inputs, key, work, cache_root),
            force=force,
        )


def find_tiny_image(out_root: Path = DEFAULT_OUT_ROOT) -> TinyImage:
    """The image `current` points at, without rebuilding or re-hashing anything.

    Raises HostError with a hint to build it when there is none.
    """
    return find_current(out_root.resolve() / "tiny", load_image, "tiny guest image", BUILD_HINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.images", description="Build (or reuse) the tiny guest image."
    )
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT)
    parser.add_argument("--cache-root", type=Path, default=DEFAULT_CACHE_ROOT)
    parser.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    t0_ns = time.monotonic_ns()
    try:
        image = build_tiny_image(args.out_root, args.force, cache_root=args.cache_root)
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    elapsed_s = (time.monotonic_ns() - t0_ns) / 1e9
    print(
        f"kernel   {image.kernel}\ninitrd   {image.initrd}\nmanifest {image.manifest}\n"
        f"key      {image.key}\n"
        f"cache    {'hit' if image.cache_hit else 'miss (built)'} in {elapsed_s:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
