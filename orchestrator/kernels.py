"""Kernels under test: Debian trixie cloud kernels (6.12, 7.x from backports) or a local bzImage.

A kernel spec names a kernel; resolving it gives the concrete Debian packages (names,
versions, suites, .deb sha256 from the apt index); fetching it downloads the .debs into
images/cache/debs-trixie/ (once) and unpacks only the kernel image and its config into
images/cache/kernels-trixie/<release>/, where it is checked for the options the lab needs.

Specs (`parse_kernel_spec`):
  "6.12", "7.3"        newest linux-image-<series>.N+debXX-cloud-amd64 in any suite
  "6.12.118"           that exact upstream version
  "backports"/"stable" what the linux-image-cloud-amd64 meta-package of trixie-backports /
                       of trixie (incl. security and updates) points at today
  "file:PATH[,initrd=PATH][,config=PATH][,label=NAME]"  a local bzImage, nothing is built

apt runs with a private configuration under images/cache/apt-trixie/: its own sources,
lists, cache and an empty dpkg status, so the host's /etc/apt and /var/lib/dpkg are never
read or written. It is passed through APT_CONFIG rather than `-o Dir::...` options on
purpose: apt reads APT_CONFIG *before* Dir::Etc::parts, and because our file points
Dir::Etc::parts at a private directory, no /etc/apt/apt.conf.d snippet of the host (proxies,
GzipIndexes, Post-Invoke hooks) is ever parsed; `-o` options are applied only after those
snippets were read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator.errors import DensitylabError, HostError, UsageError
from orchestrator.files import sha256_file, write_text_atomic
from orchestrator.images import DEFAULT_CACHE_ROOT, build_lock
from orchestrator.proc import CompletedProcess, run

log = logging.getLogger(__name__)

APT_DIRNAME = "apt-trixie"
DEBS_DIRNAME = "debs-trixie"
KERNELS_DIRNAME = "kernels-trixie"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"
FLAVOUR = "cloud-amd64"
BACKPORTS = "trixie-backports"
# (URI, suites): one deb822 stanza each; main only (the kernels and everything else we
# install are in main).
ARCHIVE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("http://deb.debian.org/debian", ("trixie", "trixie-updates", BACKPORTS)),
    ("http://deb.debian.org/debian-security", ("trixie-security",)),
)
META_PACKAGE = f"linux-image-{FLAVOUR}"
# What the lab needs from a kernel: option -> accepted values.
REQUIRED_CONFIG: dict[str, tuple[str, ...]] = {
    "CONFIG_KSM": ("y",),
    "CONFIG_KPROBES": ("y",),
    "CONFIG_KPROBE_EVENTS": ("y",),
    "CONFIG_NUMA": ("y",),
    "CONFIG_ZRAM": ("m", "y"),
    "CONFIG_MEMCG": ("y",),
}
# Recorded too, not required: they tell a reader what else the kernel can do.
NOTED_CONFIG = (
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_BPF_SYSCALL",
    "CONFIG_FUNCTION_TRACER",
    "CONFIG_SECURITY_LOCKDOWN_LSM",
    "CONFIG_TRANSPARENT_HUGEPAGE",
    "CONFIG_MIGRATION",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_PCI",
    "CONFIG_EXT4_FS",
)
BUILD_HINT = "python -m orchestrator.kernels 6.12 7.3"


# ---------------------------------------------------------------- Debian versions


def _order(c: str) -> int:
    """dpkg's character order for the non-digit parts: ~ before end, letters before others."""
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternate non-digit runs (by _order) and digit runs (numerically)."""
    while a or b:
        na, a = _split_run(a, digits=False)
        nb, b = _split_run(b, digits=False)
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        da, a = _split_run(a, digits=True)
        db, b = _split_run(b, digits=True)
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
    return 0


def _split_run(s: str, *, digits: bool) -> tuple[str, str]:
    i = 0
    while i < len(s) and s[i].isdigit() == digits:
        i += 1
    return s[:i], s[i:]


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version a sorts before, equal to or after b (dpkg's rules)."""

    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def satisfies(version: str, op: str, ref: str) -> bool:
    """Does version satisfy the relation `op ref` (op one of = >= <= >> <<)?"""
    c = compare_versions(version, ref)
    ops = {"=": c == 0, ">=": c >= 0, "<=": c <= 0, ">>": c > 0, "<<": c < 0}
    if op not in ops:
        raise UsageError(f"unknown version relation {op!r}")
    return ops[op]


# ---------------------------------------------------------------- apt output parsers


@dataclass(frozen=True)
class Relation:
    name: str
    op: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class MadisonRow:
    name: str
    version: str
    suite: str  # e.g. trixie-security


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """deb822 paragraphs (apt-cache show) as dicts; continuation lines joined with newlines."""
    out: list[dict[str, str]] = []
    for para in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        last = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if fields:
            out.append(fields)
    return out


def parse_relations(text: str) -> list[list[Relation]]:
    """A Depends-style field: AND of OR-groups of `name[:arch] [(op version)]`."""
    groups = []
    for group in filter(None, (g.strip() for g in text.split(","))):
        alts = []
        for alt in group.split("|"):
            m = re.fullmatch(
                r"\s*([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*(?:\(\s*(<<|<=|=|>=|>>)\s*(\S+)\s*\))?\s*",
                alt,
            )
            if not m:
                raise HostError(f"cannot parse package relation {alt.strip()!r}")
            alts.append(Relation(m[1], m[2], m[3]))
        groups.append(alts)
    return groups


def parse_madison(text: str) -> list[MadisonRow]:
    """`apt-cache madison` lines: `name | version | URI suite/component arch Packages`."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not parts[2].endswith("Packages"):
            continue
        where = parts[2].split()
        if len(where) < 3:
            raise HostError(f"apt-cache madison: cannot parse {line!r}")
        rows.append(MadisonRow(parts[0], parts[1], where[1].split("/")[0]))
    return rows


def newest(rows: Iterable[MadisonRow]) -> MadisonRow:
    """The highest version; between equal versions the first (apt's order) wins."""
    best: MadisonRow | None = None
    for row in rows:
        if best is None or compare_versions(row.version, best.version) > 0:
            best = row
    if best is None:
        raise HostError("no package versions to choose from")
    return best


def default_candidate(rows: Iterable[MadisonRow]) -> MadisonRow | None:
    """What apt installs without a pin: the newest version outside backports (priority 100)."""
    usual = [r for r in rows if not r.suite.endswith("-backports")]
    return newest(usual) if usual else None


def parse_kconfig(text: str) -> dict[str, str]:
    """A kernel .config as option -> value ("n" for `# CONFIG_X is not set`), quotes kept."""
    out = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip()):
            out[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
            out[m[1]] = "n"
    return out


def check_config(config: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """(the required and noted options with their values, the required ones not satisfied)."""
    wanted = [*REQUIRED_CONFIG, *NOTED_CONFIG]
    values = {opt: config.get(opt, "n") for opt in wanted}
    missing = [opt for opt, ok in REQUIRED_CONFIG.items() if values[opt] not in ok]
    return values, missing


def bzimage_release(data: bytes) -> str:
    """`uname -r` of a bzImage, from the version string its boot header points at.

    The x86 boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202, protocol
    >= 2.00, kernel_version (u16 at 0x20E) is the string's offset minus 0x200.
    Raises UsageError when data is not a bzImage or carries no version string.
    """
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        raise UsageError("not a bzImage (no HdrS boot header at 0x202)")
    offset = int.from_bytes(data[0x20E:0x210], "little")
    start = offset + 0x200
    if offset == 0 or start >= len(data):
        raise UsageError("bzImage has no kernel_version string")
    text = data[start : data.find(b"\0", start)].decode("ascii", errors="replace")
    if not text.split():
        raise UsageError("bzImage kernel_version string is empty")
    return text.split()[0]


def series_of(release: str) -> str:
    """6.12.118+deb13-cloud-amd64 -> 6.12."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise UsageError(f"{release!r}: not a kernel release string")
    return f"{m[1]}.{m[2]}"


# ---------------------------------------------------------------- specs and resolution


@dataclass(frozen=True)
class KernelSpec:
    """What the user asked for: a Debian selector, or a local bzImage."""

    text: str
    debian: str | None = None  # "6.12", "6.12.118", "backports", "stable"
    bzimage: Path | None = None
    initrd: Path | None = None
    config: Path | None = None
    label: str | None = None


def parse_kernel_spec(text: str) -> KernelSpec:
    """See the module docstring for the forms; raises UsageError naming the bad part."""
    text = text.strip()
    if text.startswith("file:"):
        path, *opts = text.removeprefix("file:").split(",")
        extra: dict[str, str] = {}
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep or key not in ("initrd", "config", "label") or not value:
                raise UsageError(f"kernel spec {text!r}: expected initrd=, config= or label=")
            extra[key] = value
        return KernelSpec(
            text,
            bzimage=Path(path),
            initrd=Path(extra["initrd"]) if "initrd" in extra else None,
            config=Path(extra["config"]) if "config" in extra else None,
            label=extra.get("label"),
        )
    if text in ("backports", "stable") or re.fullmatch(r"\d+\.\d+(\.\d+)?", text):
        return KernelSpec(text, debian=text)
    raise UsageError(
        f"kernel spec {text!r}: expected 6.12, 7.3, 6.12.118, backports, stable or file:PATH"
    )


class AptQuery(Protocol):
    """apt-cache, reduced to what resolution needs; recorded output can stand in for it."""

    def __call__(self, args: Sequence[str]) -> str: ...


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    suite: str
    sha256: str
    size_bytes: int
    filename: str  # pool path in the archive
    arch: str = ARCH  # "all" for arch-independent packages (linux-base)

    @property
    def deb_name(self) -> str:
        """The file name apt gives it in an archives directory (':' is escaped)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    @property
    def pin(self) -> str:
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class KernelResolution:
    """A Debian kernel spec turned into concrete packages."""

    label: str  # "6.12", "7.3"
    release: str  # uname -r
    image: DebPackage  # linux-image-<release>
    packages: tuple[DebPackage, ...]  # image and the exact-version packages it pulls in
    pins: tuple[DebPackage, ...]  # generic deps needing a newer suite (linux-base)


IMAGE_RE = r"linux-image-({version})\+deb\d+(?:\.\d+)?-{flavour}"


def kernel_candidates(pkgnames: str, selector: str, flavour: str = FLAVOUR) -> list[str]:
    """Package names of `apt-cache pkgnames linux-image-` matching 6.12 / 6.12.118."""
    version = re.escape(selector) + (r"\.\d+" if selector.count(".") == 1 else "")
    pattern = re.compile(IMAGE_RE.format(version=version, flavour=re.escape(flavour)))
    return sorted(n for n in pkgnames.split() if pattern.fullmatch(n))


def _show(apt: AptQuery, name: str, version: str) -> dict[str, str]:
    for stanza in parse_stanzas(apt(["show", f"{name}={version}"])):
        if stanza.get("Package") == name and stanza.get("Version") == version:
            return stanza
    raise HostError(f"apt-cache show {name}={version}: no such package version")


def _deb(stanza: Mapping[str, str], suite: str) -> DebPackage:
    try:
        return DebPackage(
            stanza["Package"],
            stanza["Version"],
            suite,
            stanza["SHA256"],
            int(stanza["Size"]),
            stanza["Filename"],
            stanza.get("Architecture", ARCH),
        )
    except (KeyError, ValueError) as e:
        raise HostError(f"apt-cache show {stanza.get('Package')}: field missing: {e}") from e


def _image_row(spec: KernelSpec, apt: AptQuery) -> MadisonRow:
    """The linux-image-<release> package (name, version, suite) the selector means."""
    assert spec.debian is not None
    if spec.debian in ("backports", "stable"):
        rows = parse_madison(apt(["madison", META_PACKAGE]))
        pick = [r for r in rows if (r.suite == BACKPORTS) == (spec.debian == "backports")]
        if not pick:
            raise HostError(f"no {META_PACKAGE} in {spec.debian}: is the apt index current?")
        meta = newest(pick)
        deps = parse_relations(_show(apt, meta.name, meta.version).get("Depends", ""))
        images = [
            alt for group in deps for alt in group if re.fullmatch(IMAGE_RE.format(
                version=r"\d+\.\d+\.\d+", flavour=re.escape(FLAVOUR)), alt.name)
        ]  # fmt: skip
        if not images or images[0].version is None:
            raise HostError(f"{META_PACKAGE} {meta.version} depends on no linux-image-*")
        return MadisonRow(images[0].name, images[0].version, meta.suite)
    names = kernel_candidates(apt(["pkgnames", "linux-image-"]), spec.debian)
    if not names:
        raise HostError(f"no linux-image-{spec.debian}*-{FLAVOUR} in the trixie archive")
    return newest(parse_madison(apt(["madison", *names])))


def resolve_kernel(spec: KernelSpec, apt: AptQuery) -> KernelResolution:
    """The concrete packages of a Debian kernel spec.

    Exact-version dependencies (linux-binary-, linux-modules-, linux-base-<release>) are
    followed and become part of the kernel; a generic dependency whose version constraint
    the usual (non-backports) candidate does not meet is pinned to the newest version that
    does (7.x needs linux-base from trixie-backports). Raises HostError if apt lacks them.
    """
    row = _image_row(spec, apt)
    release = row.name.removeprefix("linux-image-")
    todo = [row]
    kernel: dict[str, DebPackage] = {}
    generic: list[Relation] = []
    while todo:
        cur = todo.pop()
        if cur.name in kernel:
            continue
        stanza = _show(apt, cur.name, cur.version)
        kernel[cur.name] = _deb(stanza, cur.suite)
        relations = parse_relations(stanza.get("Pre-Depends", ""))
        relations += parse_relations(stanza.get("Depends", ""))
        for group in relations:
            rel = group[0]
            if len(group) == 1 and rel.op == "=" and release in rel.name and rel.version:
                suites = parse_madison(apt(["madison", rel.name]))
                match = [r for r in suites if r.version == rel.version]
                if not match:
                    raise HostError(f"{cur.name} needs {rel.name}={rel.version}: not in apt")
                todo.append(match[0])
            elif len(group) == 1 and rel.op and rel.version:
                generic.append(rel)
    pins = tuple(_pin(rel, apt) for rel in generic)
    return KernelResolution(
        label=series_of(release),
        release=release,
        image=kernel[row.name],
        packages=tuple(sorted(kernel.values(), key=lambda p: p.name)),
        pins=tuple(p for p in pins if p is not None),
    )


def _pin(rel: Relation, apt: AptQuery) -> DebPackage | None:
    """None if apt's usual candidate meets rel, else the newest version that does."""
    assert rel.op is not None and rel.version is not None
    rows = parse_madison(apt(["madison", rel.name]))
    usual = default_candidate(rows)
    if usual is not None and satisfies(usual.version, rel.op, rel.version):
        return None
    ok = [r for r in rows if satisfies(r.version, rel.op, rel.version)]
    if not ok:
        raise HostError(f"no {rel.name} ({rel.op} {rel.version}) in the trixie archive")
    best = newest(ok)
    return _deb(_show(apt, best.name, best.version), best.suite)


# ---------------------------------------------------------------- the private apt


@dataclass(frozen=True)
class PrivateApt:
    """apt with its own configuration, state and cache under root (never /etc/apt)."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "apt.conf"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def lists(self) -> Path:
        return self.root / "state" / "lists"

    @property
    def sources_file(self) -> Path:
        return self.etc / "sources.list.d" / "trixie.sources"

    def conf_text(self) -> str:
        r, e = self.root, self.etc
        settings = {
            "Dir::Etc": e,
            "Dir::Etc::main": e / "apt.conf",
            "Dir::Etc::parts": e / "apt.conf.d",
            "Dir::Etc::sourcelist": e / "sources.list",
            "Dir::Etc::sourceparts": e / "sources.list.d",
            "Dir::Etc::preferences": e / "preferences",
            "Dir::Etc::preferencesparts": e / "preferences.d",
            "Dir::Etc::trusted": e / "trusted.gpg",
            "Dir::Etc::trustedparts": e / "trusted.gpg.d",
            "Dir::State": r / "state",
            "Dir::State::lists": self.lists,
            "Dir::State::status": r / "status",
            "Dir::Cache": r / "cache",
            "APT::Architecture": ARCH,
            "Acquire::Languages": "none",
            # root owns the cache; the _apt sandbox user could not write it (apt warns)
            "APT::Sandbox::User": "root",
        }
        lines = [f'{k} "{v}";' for k, v in settings.items()]
        return "// densitylab private apt configuration: nothing from /etc/apt\n" + "\n".join(
            [*lines, f'APT::Architectures {{ "{ARCH}"; }};', ""]
        )

    def ensure(self) -> None:
        """Create the layout and (re)write the configuration when it differs."""
        for d in (
            self.etc / "apt.conf.d",
            self.etc / "preferences.d",
            self.etc / "trusted.gpg.d",
            self.etc / "sources.list.d",
            self.lists / "partial",
            self.root / "cache" / "archives" / "partial",
        ):
            d.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (self.conf, self.conf_text()),
            (self.sources_file, sources_deb822()),
            (self.etc / "apt.conf", ""),
        ):
            if not path.is_file() or path.read_text() != text:
                write_text_atomic(path, text)
        if not (self.root / "status").exists():
            write_text_atomic(self.root / "status", "")
        if not KEYRING.is_file():
            raise HostError(f"{KEYRING} missing: apt-get install debian-archive-keyring")

    def env(self) -> dict[str, str]:
        return {**os.environ, "APT_CONFIG": str(self.conf), "LC_ALL": "C.UTF-8"}

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        timeout_s: float = 600,
        cwd: str | Path | None = None,
    ) -> CompletedProcess[str]:
        """proc.run with APT_CONFIG pointing at the private configuration."""
        self.ensure()
        return run(argv, env=self.env(), timeout_s=timeout_s, cwd=cwd)

    def apt_cache(self, args: Sequence[str]) -> str:
        return self.run(["apt-cache", *args], timeout_s=120).stdout

    def lists_age_s(self) -> float | None:
        releases = list(self.lists.glob("*InRelease"))
        if not releases:
            return None
        return time.time() - min(p.stat().st_mtime for p in releases)

    def update(self, *, force: bool = False) -> bool:
        """apt-get update if there are no lists yet, or if forced; True if it ran.

        Not on a timer: a kernel spec like "6.12" must not move to a new Debian upload
        between two runs unless someone asked for it (--refresh); the manifest of every
        build records the versions it got.
        """
        self.ensure()
        if not force and self.lists_age_s() is not None:
            return False
        try:
            cp = self.run(["apt-get", "update"], timeout_s=600)
        except DensitylabError as e:
            e.add_note("the private apt needs deb.debian.org (trixie, backports, security)")
            raise
        # apt-get update exits 0 even when a suite failed to download: treat W:/E: as fatal
        bad = [ln for ln in cp.stderr.splitlines() if ln.startswith(("E:", "W:"))]
        if bad:
            raise HostError(f"apt-get update (private, {self.root}): {bad[0]}")
        return True

    def index_digest(self) -> str:
        """sha256 over the InRelease files: it changes exactly when an index changes."""
        h = hashlib.sha256()
        for p in sorted(self.lists.glob("*InRelease")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        return h.hexdigest()


def sources_deb822(keyring: Path = KEYRING) -> str:
    stanzas = [
        f"Types: deb\nURIs: {uri}\nSuites: {' '.join(suites)}\nComponents: main\n"
        f"Architectures: {ARCH}\nSigned-By: {keyring}\n"
        for uri, suites in ARCHIVE
    ]
    return "\n".join(stanzas)


def private_apt(cache_root: Path = DEFAULT_CACHE_ROOT) -> PrivateApt:
    return PrivateApt(cache_root.resolve() / APT_DIRNAME)


class RecordingApt:
    """Wraps an AptQuery and remembers every answer (to record tests/data from a real apt)."""

    def __init__(self, inner: AptQuery):
        self.inner = inner
        self.answers: dict[str, str] = {}

    def __call__(self, args: Sequence[str]) -> str:
        text = self.inner(args)
        self.answers[" ".join(args)] = text
        return text


# ---------------------------------------------------------------- fetch and inspect


@dataclass(frozen=True)
class KernelArtifact:
    """A kernel ready to boot or install: what it is, where it came from, what it can do."""

    label: str  # "6.12", "7.3"
    release: str  # uname -r
    origin: str  # debian:<image pkg>=<version> or file:<bzImage path>
    vmlinuz: Path
    vmlinuz_sha256: str
    config_sha256: str | None  # None: a local bzImage given without a config
    config: dict[str, str] = field(default_factory=dict)  # REQUIRED + NOTED options
    missing: tuple[str, ...] = ()  # required options not satisfied
    packages: tuple[DebPackage, ...] = ()  # the kernel's own packages (Debian only)
    pins: tuple[DebPackage, ...] = ()  # generic packages pinned to a newer suite
    debs: tuple[Path, ...] = ()  # downloaded .debs, packages then pins
    initrd: Path | None = None  # a local kernel's initrd; Debian ones get theirs installed

    def packages_by_name(self) -> dict[str, DebPackage]:
        return {p.name: p for p in self.packages}

    def require_lab_features(self) -> None:
        """Raise HostError when the config lacks what the lab needs (unknown is not lacking)."""
        if self.missing:
            got = ", ".join(f"{o}={self.config.get(o, 'n')}" for o in self.missing)
            raise HostError(f"kernel {self.release} ({self.origin}) lacks {got}")

    def record(self) -> dict[str, object]:
        """JSON-ready description, for manifests."""
        data = asdict(self)
        for key in ("vmlinuz", "initrd"):
            data[key] = None if data[key] is None else str(data[key])
        data["debs"] = [str(p) for p in self.debs]
        return data


def download_debs(apt: PrivateApt, packages: Iterable[DebPackage], debs_dir: Path) -> list[Path]:
    """The .debs in debs_dir (apt's own file names), downloaded once, checked by sha256."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    wanted = list(packages)
    todo = [p for p in wanted if not _cached_ok(debs_dir / p.deb_name, p)]
    if todo:
        log.info("downloading %s", ", ".join(p.pin for p in todo))
        with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".download-") as tmp:
            try:
                apt.run(["apt-get", "download", *(p.pin for p in todo)], cwd=tmp, timeout_s=900)
            except DensitylabError as e:
                e.add_note("the apt lists may be older than the archive: try --refresh")
                raise
            for p in todo:
                got = Path(tmp) / p.deb_name
                if not got.is_file() or sha256_file(got) != p.sha256:
                    raise HostError(f"apt-get download {p.pin}: no .deb matching the index")
                os.replace(got, debs_dir / p.deb_name)
    return [debs_dir / p.deb_name for p in wanted]


def _cached_ok(path: Path, pkg: DebPackage) -> bool:
    return (
        path.is_file() and path.stat().st_size == pkg.size_bytes and sha256_file(path) == pkg.sha256
    )


BOOT_FILES = {
    # where Debian packages put the image and config: /boot (6.12) or, with the split
    # linux-binary/linux-base packages of 7.x, the module directory
    "vmlinuz": ("boot/vmlinuz-{r}", "usr/lib/modules/{r}/vmlinuz", "lib/modules/{r}/vmlinuz"),
    "config": ("boot/config-{r}", "usr/lib/modules/{r}/config", "lib/modules/{r}/config"),
}


def deb_members(deb: Path) -> list[str]:
    """Paths inside a .deb's data archive, without the leading ./"""
    cp = run(["dpkg-deb", "-c", deb], timeout_s=120)
    return [
        ln.split()[5].removeprefix("./") for ln in cp.stdout.splitlines() if len(ln.split()) >= 6
    ]


def extract_boot_files(debs: Sequence[Path], release: str, dest: Path) -> dict[str, Path]:
    """Unpack only the debs holding vmlinuz/config and copy those two files into dest."""
    wanted = {kind: [p.format(r=release) for p in paths] for kind, paths in BOOT_FILES.items()}
    found: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as tmp:
        for deb in debs:
            members = set(deb_members(deb))
            hits = {k: next((m for m in ms if m in members), None) for k, ms in wanted.items()}
            if not any(hits.values()):
                continue
            tree = Path(tmp) / deb.stem
            run(["dpkg-deb", "-x", deb, tree], timeout_s=300)
            for kind, member in hits.items():
                if member and kind not in found:
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(tree / member, dest / kind)
                    found[kind] = dest / kind
    if set(found) != set(BOOT_FILES):
        raise HostError(f"kernel {release}: no vmlinuz or config in {[d.name for d in debs]}")
    return found


def fetch_debian_kernel(
    resolution: KernelResolution, apt: PrivateApt, cache_root: Path = DEFAULT_CACHE_ROOT
) -> KernelArtifact:
    """Download the kernel's .debs (cached) and inspect its vmlinuz and config (cached)."""
    cache_root = cache_root.resolve()
    debs = download_debs(apt, [*resolution.packages, *resolution.pins], cache_root / DEBS_DIRNAME)
    own_debs = debs[: len(resolution.packages)]
    kdir = cache_root / KERNELS_DIRNAME / resolution.release
    stamp = kdir / "from.json"
    want = {p.name: p.sha256 for p in resolution.packages}
    try:
        cached = json.loads(stamp.read_text()) == want
    except (OSError, ValueError):
        cached = False
    if not cached or not (kdir / "vmlinuz").is_file() or not (kdir / "config").is_file():
        kdir.mkdir(parents=True, exist_ok=True)
        extract_boot_files(own_debs, resolution.release, kdir)
        write_text_atomic(stamp, json.dumps(want, indent=1, sort_keys=True))
    config_text = (kdir / "config").read_text()
    values, missing = check_config(parse_kconfig(config_text))
    return KernelArtifact(
        label=resolution.label,
        release=resolution.release,
        origin=f"debian:{resolution.image.pin}",
        vmlinuz=kdir / "vmlinuz",
        vmlinuz_sha256=sha256_file(kdir / "vmlinuz"),
        config_sha256=sha256_file(kdir / "config"),
        config=values,
        missing=tuple(missing),
        packages=resolution.packages,
        pins=resolution.pins,
        debs=tuple(debs),
    )


def local_kernel(spec: KernelSpec) -> KernelArtifact:
    """A bzImage (+ optional initrd, config) from disk; raises UsageError for bad paths."""
    assert spec.bzimage is not None
    for what, path in (("bzImage", spec.bzimage), ("initrd", spec.initrd), ("config", spec.config)):
        if path is not None and not path.is_file():
            raise UsageError(f"kernel spec {spec.text!r}: {what} {path} is not a file")
    bzimage = spec.bzimage.resolve()
    with bzimage.open("rb") as f:
        release = bzimage_release(f.read(0x10000))
    values: dict[str, str] = {}
    missing: list[str] = []
    if spec.config is not None:
        values, missing = check_config(parse_kconfig(spec.config.read_text()))
    return KernelArtifact(
        label=spec.label or series_of(release),
        release=release,
        origin=f"file:{bzimage}",
        vmlinuz=bzimage,
        vmlinuz_sha256=sha256_file(bzimage),
        config_sha256=sha256_file(spec.config) if spec.config else None,
        config=values,
        missing=tuple(missing),
        initrd=spec.initrd.resolve() if spec.initrd else None,
    )


def fetch_kernel(
    spec: KernelSpec | str,
    *,
    cache_root: Path = DEFAULT_CACHE_ROOT,
    apt: PrivateApt | None = None,
    refresh: bool = False,
    require: bool = True,
) -> KernelArtifact:
    """Resolve and fetch one kernel. With require, a kernel lacking a needed option raises
    HostError; UsageError for a bad spec, CommandError when apt fails."""
    if isinstance(spec, str):
        spec = parse_kernel_spec(spec)
    if spec.bzimage is not None:
        artifact = local_kernel(spec)
    else:
        apt = apt or private_apt(cache_root)
        with build_lock(_lock_dir(apt)):
            apt.update(force=refresh)
            resolution = resolve_kernel(spec, apt.apt_cache)
            artifact = fetch_debian_kernel(resolution, apt, cache_root)
    if require:
        artifact.require_lab_features()
    return artifact


def _lock_dir(apt: PrivateApt) -> Path:
    apt.root.mkdir(parents=True, exist_ok=True)
    return apt.root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.kernels",
        description="Resolve and fetch kernels under test; print what they are.",
    )
    parser.add_argument("specs", nargs="*", default=["6.12", "7.3"])
    parser.add_argument("--cache-root", type=Path, default=DEFAULT_CACHE_ROOT)
    parser.add_argument("--refresh", action="store_true", help="apt-get update first")
    parser.add_argument(
        "--record", type=Path, help="also write the apt-cache answers seen to this JSON file"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.record:
            apt = private_apt(args.cache_root)
            apt.update(force=args.refresh)
            rec = RecordingApt(apt.apt_cache)
            for text in args.specs:
                resolve_kernel(parse_kernel_spec(text), rec)
            write_text_atomic(args.record, json.dumps(rec.answers, indent=1, sort_keys=True) + "\n")
        for text in args.specs:
            k = fetch_kernel(text, cache_root=args.cache_root, refresh=args.refresh)
            print(json.dumps(k.record(), indent=2))
    except DensitylabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
