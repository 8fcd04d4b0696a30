"""Kernels densitylab builds from source, and the built kernels a lab host boots.

A `source:` kernel entry (orchestrator.kernelspec) is built out of tree (`make O=`)
from Debian's linux-source package or a tree of your own, with patches applied in
order and a config made of a base (tinyconfig, defconfig or a file), the lab's fragment
(images/labhost/kernel.config: everything the lab needs built in, so no modules and no
initramfs) and an optional fragment of the entry's own.

The cache lives outside the repository clone, so every clone and CI job on one machine
shares it ($DENSITYLAB_KBUILD_CACHE, default /var/cache/densitylab/kbuild):

    src/<package>_<version>_all.deb     Debian source packages (apt-get download)
    work/<source>/{src,build,state.json,applied/}
                                        one scratch tree per source: the patches of the
                                        last build stay applied, and the next build
                                        reverts and applies only what differs, so make
                                        and ccache see the same paths and rebuild only
                                        the files a patch touches
    ccache/                             CCACHE_DIR, shared by every build
    builds/<key>/{bzImage,config,System.map,build.log,meta.json}
                                        finished builds only: staged in builds/.tmp-*
                                        and renamed into place when complete

The key is sha256 over the source's identity and digest, the patches' sha256s (in
order), the config base and fragments, the toolchain's versions and FORMAT. The build
runs under `nice -n 19` (the machine is shared); bad input (a patch that does not
apply, a missing source, a config that lacks what the lab needs) is a UsageError naming
it, raised before anything reaches builds/.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from orchestrator import kernels
from orchestrator.errors import CommandError, HostError, UsageError
from orchestrator.files import sha256_file, write_text_atomic
from orchestrator.images import IMAGES_DIR
from orchestrator.kernelspec import (
    BuildKernel,
    DebianSource,
    DebKernel,
    KernelEntry,
    SourceKernel,
    TreeSource,
)
from orchestrator.proc import (
    PIPE,
    STDERR_TAIL_CHARS,
    STDOUT,
    TimeoutExpired,
    run,
    spawn_group,
    stop_group,
)

log = logging.getLogger(__name__)

CACHE_ENV = "DENSITYLAB_KBUILD_CACHE"
DEFAULT_CACHE = Path("/var/cache/densitylab/kbuild")
LAB_FRAGMENT = IMAGES_DIR / "labhost" / "kernel.config"
FORMAT = 1  # bump when the build procedure changes what a key's build contains
ARCH = "x86_64"
BASES = ("tinyconfig", "defconfig")
BUILD_TIMEOUT_S = 4 * 3600
CONFIG_TIMEOUT_S = 600
CCACHE_MAX = "8G"
# Lines of a kbuild log that are one step each (CC, LD, AR, ...): counted for progress.
STEP_RE = re.compile(r"^\s+(CC|LD|AR|AS|HOSTCC|OBJCOPY|GEN|CALL|UPD|SYNC)\b")
BUILD_HINT = "run `densitylab kernels build SPEC` (make kernels SPEC=...)"


class PatchError(UsageError):
    """A patch does not apply to the source it was given for."""

    def __init__(self, patch: Path, hunk: str):
        self.patch = patch
        self.hunk = hunk
        super().__init__(f"{patch}: does not apply: {hunk}")


class SourceMissing(UsageError):
    """The kernel source of an entry is not there (and could not be fetched)."""


class ConfigLacks(UsageError):
    """After olddefconfig the config lacks options the lab (or the entry) requires."""

    def __init__(self, label: str, lacking: Sequence[str], base: str):
        self.label = label
        self.lacking = list(lacking)
        super().__init__(
            f"kernel {label}: config lacks {', '.join(lacking)} after olddefconfig "
            f"(base {base}): a fragment unsets it or a dependency is missing"
        )


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class SourceTree:
    ident: str  # the work directory's name
    digest: str  # sha256 naming the content
    origin: str  # debian:<package>=<version> or tree:<absolute path>
    archive: Path | None = None  # the Debian source .deb
    tree: Path | None = None


@dataclass(frozen=True)
class Patch:
    path: Path
    sha256: str

    def record(self) -> dict[str, str]:
        return {"name": self.path.name, "path": str(self.path), "sha256": self.sha256}


@dataclass(frozen=True)
class BuildPlan:
    """Everything a source entry's build depends on; key() names its cache entry."""

    label: str
    source: SourceTree
    patches: tuple[Patch, ...]
    base: str  # tinyconfig, defconfig or an absolute config path
    base_sha256: str | None
    fragments: tuple[Path, ...]  # the lab's, then the entry's own
    fragment_sha256s: tuple[str, ...]
    toolchain: tuple[tuple[str, str], ...]

    def key(self) -> str:
        blob = json.dumps(
            {
                "format": FORMAT,
                "arch": ARCH,
                "source": [self.source.origin, self.source.digest],
                "patches": [p.sha256 for p in self.patches],
                "base": self.base if self.base_sha256 is None else self.base_sha256,
                "fragments": list(self.fragment_sha256s),
                "toolchain": dict(self.toolchain),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def localversion(self) -> str:
        """Appended to the release: each build has its own `uname -r`, and the part
        before '+' stays the tree's version (the A/B hygiene check compares that)."""
        return f"+dl{self.key()[:10]}"


@lru_cache(maxsize=32)
def _sha256_cached(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(path, st.st_size, st.st_mtime_ns)


def debian_source(src: DebianSource, cache: Path, *, fetch: bool) -> SourceTree:
    """The newest cached .deb of Debian's source package, downloaded when there is none."""
    pkg, where = src.debian, cache / "src"
    debs = sorted(where.glob(f"{pkg}_*_all.deb"))
    if not debs and fetch:
        download_source(pkg, where)
        debs = sorted(where.glob(f"{pkg}_*_all.deb"))
    if not debs:
        raise SourceMissing(f"source {pkg}: no {pkg}_*_all.deb in {where}; {BUILD_HINT}")
    deb = debs[0]
    for d in debs[1:]:
        if kernels.compare_versions(deb_version(d), deb_version(deb)) > 0:
            deb = d
    origin = f"debian:{pkg}={deb_version(deb)}"
    return SourceTree(f"debian-{pkg}", file_sha256(deb), origin, deb)


def deb_version(deb: Path) -> str:
    """The version in apt's file name <package>_<version>_<arch>.deb."""
    return deb.name.split("_")[1]


def download_source(pkg: str, where: Path) -> None:
    """apt-get download into a temporary directory, then into place (never half a .deb)."""
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix=".download-") as tmp:
        try:
            run(["apt-get", "download", pkg], cwd=tmp, timeout_s=1800)
        except CommandError as e:
            last = (e.stderr_tail.strip().splitlines() or ["no output"])[-1]
            raise SourceMissing(f"source {pkg}: apt-get download failed: {last}") from e
        for got in Path(tmp).glob(f"{pkg}_*_all.deb"):
            os.replace(got, where / got.name)


def tree_source(src: TreeSource) -> SourceTree:
    """A kernel tree of your own; its digest covers every file's path, size and mtime
    (.git skipped): cheap on a 80,000-file tree, and make uses mtimes too."""
    tree = Path(src.tree).resolve()
    if not (tree / "Makefile").is_file() or not (tree / "Kconfig").is_file():
        raise SourceMissing(
            f"source.tree: {src.tree}: not a kernel source tree (no Makefile, Kconfig)"
        )
    if (tree / ".config").exists() or (tree / "include" / "config").exists():
        raise UsageError(
            f"source.tree: {src.tree}: has a .config: out-of-tree builds need a clean "
            "tree (make mrproper)"
        )
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    ident = "tree-" + hashlib.sha256(str(tree).encode()).hexdigest()[:12]
    return SourceTree(ident, h.hexdigest(), f"tree:{tree}", tree=tree)


def expand_patches(entries: Sequence[str]) -> tuple[Patch, ...]:
    """Files in the order given; a directory stands for its *.patch and *.diff, sorted."""
    out: list[Patch] = []
    for e in entries:
        p = Path(e).resolve()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".patch", ".diff"))
            if not files:
                raise UsageError(f"patches: {e}: directory holds no *.patch or *.diff")
        elif p.is_file():
            files = [p]
        else:
            raise UsageError(f"patches: {e}: no such file or directory")
        out += [Patch(f, file_sha256(f)) for f in files]
    return tuple(out)


def toolchain() -> tuple[tuple[str, str], ...]:
    """First lines of gcc, ld and make --version: a compiler upgrade is a new key."""
    out = []
    for tool in ("gcc", "ld", "make"):
        cp = run([tool, "--version"], timeout_s=30)
        out.append((tool, (cp.stdout.splitlines() or [""])[0].strip()))
    return tuple(out)


def make_plan(entry: SourceKernel, cache: Path, *, fetch: bool = False) -> BuildPlan:
    """Resolve an entry's inputs (no build); raises SourceMissing or UsageError."""
    src = entry.source
    try:
        source = (
            debian_source(src, cache, fetch=fetch)
            if isinstance(src, DebianSource)
            else tree_source(src)
        )
    except UsageError as e:
        e.args = (f"kernel {entry.label}: {e}",)
        raise
    base, base_sha = entry.config.base, None
    if base not in BASES:
        path = Path(base).resolve()
        if not path.is_file():
            raise UsageError(f"kernel {entry.label}: config.base: {base}: no such file")
        base, base_sha = str(path), file_sha256(path)
    fragments = [LAB_FRAGMENT]
    if entry.config.fragment is not None:
        frag = Path(entry.config.fragment).resolve()
        if not frag.is_file():
            raise UsageError(
                f"kernel {entry.label}: config.fragment: {entry.config.fragment}: no such file"
            )
        fragments.append(frag)
    return BuildPlan(
        label=entry.label,
        source=source,
        patches=expand_patches(entry.patches),
        base=base,
        base_sha256=base_sha,
        fragments=tuple(fragments),
        fragment_sha256s=tuple(file_sha256(f) for f in fragments),
        toolchain=toolchain(),
    )


# ---------------------------------------------------------------- the scratch tree


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """One builder per scratch tree; a second one waits, then finds a cache hit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_state(work: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((work / "state.json").read_text())
        return state if isinstance(state, dict) else None
    except (OSError, ValueError):
        return None


def write_state(work: Path, digest: str, applied: Sequence[str], clean: bool) -> None:
    state = {"digest": digest, "applied": list(applied), "clean": clean}
    write_text_atomic(work / "state.json", json.dumps(state))


def populate(work: Path, source: SourceTree) -> None:
    """A fresh copy of the source at work/src (the old one and the build dir go). The
    state goes first: a kill from here on leaves no state, so the next build starts over
    instead of trusting a list of applied patches that no longer holds."""
    (work / "state.json").unlink(missing_ok=True)
    for d in ("src", "build", "applied", ".populate"):
        shutil.rmtree(work / d, ignore_errors=True)
    tmp = work / ".populate"
    tmp.mkdir(parents=True)
    if source.archive is not None:
        run(["dpkg-deb", "-x", source.archive, tmp / "deb"], timeout_s=600)
        tarballs = sorted((tmp / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if not tarballs:
            raise SourceMissing(f"{source.archive}: holds no linux-source tarball")
        run(["tar", "-xf", tarballs[0], "-C", tmp], timeout_s=1200)
        top = tmp / tarballs[0].name.split(".tar")[0]
    else:
        assert source.tree is not None
        top = tmp / "tree"
        run(["cp", "-a", "--reflink=auto", f"{source.tree}/.", top], timeout_s=1200)
    os.rename(top, work / "src")
    shutil.rmtree(tmp)
    (work / "applied").mkdir()


def patch_argv(src: Path, patch: Path, *, reverse: bool = False, dry: bool = False) -> list[str]:
    return ["patch", "-d", str(src), "-p1", "-f", "-N", "--no-backup-if-mismatch",
            "-r", "-", *(["-R"] if reverse else []), *(["--dry-run"] if dry else []),
            "-i", str(patch)]  # fmt: skip


def first_failure(output: str) -> str:
    """The first failing hunk of `patch` output: 'mm/ksm.c hunk #2 FAILED at 1234'."""
    current = "?"
    for line in output.splitlines():
        if m := re.match(r"(?:checking|patching) file '?([^']+?)'?$", line):
            current = m[1]
        elif m := re.match(r"Hunk #(\d+) FAILED at (\d+)", line):
            return f"{current} hunk #{m[1]} FAILED at line {m[2]}"
        elif "can't find file to patch" in line:
            return "a file it patches is not in the tree"
        elif "Reversed (or previously applied) patch detected" in line:
            return f"{current}: already applied (or reversed)"
        elif "Only garbage was found" in line:
            return "not a patch (no diff found)"
    return (output.strip().splitlines() or ["patch failed"])[-1]


def apply_patch(src: Path, patch: Path) -> None:
    """Dry run first, so a failing patch leaves the tree as it was."""
    cp = run(patch_argv(src, patch, dry=True), timeout_s=120, check=False)
    if cp.returncode != 0:
        raise PatchError(patch, first_failure(cp.stdout + cp.stderr))
    run(patch_argv(src, patch), timeout_s=120)


def revert_all(work: Path, applied: Sequence[str]) -> bool:
    """Reverse the saved copies of the applied patches, last first; False if one fails."""
    for sha in reversed(applied):
        cp = run(patch_argv(work / "src", work / "applied" / sha, reverse=True), check=False)
        if cp.returncode != 0:
            return False
        (work / "applied" / sha).unlink()
    return True


def prepare_source(work: Path, source: SourceTree, patches: Sequence[Patch]) -> None:
    """Make work/src the source with exactly these patches applied, touching only the
    files that differ from the last build (so make rebuilds only those)."""
    state = read_state(work)
    fresh = (
        state is None
        or state.get("digest") != source.digest
        or not state.get("clean")
        or not (work / "src").is_dir()
    )
    if fresh:
        log.info("kbuild: unpacking %s into %s", source.origin, work / "src")
        populate(work, source)
        state = {"applied": []}
    assert state is not None
    applied = list(state.get("applied", []))
    wanted = [p.sha256 for p in patches]
    if applied == wanted:
        write_state(work, source.digest, applied, True)
        return
    write_state(work, source.digest, applied, False)  # a kill from here on: repopulate
    if not revert_all(work, applied):
        populate(work, source)
    applied = []
    try:
        for p in patches:
            apply_patch(work / "src", p.path)
            shutil.copyfile(p.path, work / "applied" / p.sha256)
            applied.append(p.sha256)
    except PatchError:
        if revert_all(work, applied):
            write_state(work, source.digest, [], True)
        raise
    write_state(work, source.digest, applied, True)


# ---------------------------------------------------------------- config and build


def make_argv(plan: BuildPlan, work: Path, targets: Sequence[str], jobs: int = 1) -> list[str]:
    return ["make", "-C", str(work / "src"), f"O={work / 'build'}", f"ARCH={ARCH}",
            f"-j{jobs}", "CC=ccache gcc", f"LOCALVERSION={plan.localversion()}",
            "KBUILD_BUILD_USER=densitylab", "KBUILD_BUILD_HOST=densitylab",
            *targets]  # fmt: skip


def build_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "CCACHE_DIR": str(cache / "ccache"), "CCACHE_MAXSIZE": CCACHE_MAX}


def fragment_options(path: Path) -> dict[str, str]:
    return kernels.parse_kconfig(path.read_text())


def required_options(plan: BuildPlan) -> dict[str, str]:
    """The lab fragment's options, then the entry's own: a fragment that unsets what the
    lab needs (CONFIG_KSM, ...) makes the config lack it, and the build stops."""
    req: dict[str, str] = {}
    for i, frag in enumerate(plan.fragments):
        for opt, val in fragment_options(frag).items():
            if i == 0 or opt not in req:
                req[opt] = val
    return req


def configure(plan: BuildPlan, work: Path, env: dict[str, str]) -> Path:
    """base, fragments appended, olddefconfig; the result checked. Returns .config."""
    build = work / "build"
    build.mkdir(parents=True, exist_ok=True)
    config = build / ".config"
    if plan.base in BASES:
        run(make_argv(plan, work, [plan.base]), timeout_s=CONFIG_TIMEOUT_S, env=env)
    else:
        shutil.copyfile(plan.base, config)
    text = config.read_text()
    for frag in plan.fragments:
        text += f"\n# densitylab: {frag.name}\n" + frag.read_text()
    config.write_text(text)
    run(make_argv(plan, work, ["olddefconfig"]), timeout_s=CONFIG_TIMEOUT_S, env=env)
    got = kernels.parse_kconfig(config.read_text())
    lacking = [f"{o}={v}" for o, v in required_options(plan).items() if got.get(o, "n") != v]
    if lacking:
        raise ConfigLacks(plan.label, lacking, Path(plan.base).name)
    return config


ProgressFn = Callable[[int, int | None, float], None]  # steps done, expected, elapsed s


def run_build(
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str],
    progress: ProgressFn | None,
    expected: int | None,
) -> int:
    """Run make in its own process group (all of it dies on Ctrl-C or a timeout), the
    output teed to log_path; returns the number of build steps it printed."""
    t0 = time.monotonic()
    steps = 0
    with log_path.open("w", buffering=1) as logf:  # line-buffered: tail -f works
        child = spawn_group(["nice", "-n", "19", *argv], stdout=PIPE, stderr=STDOUT, env=env)
        try:
            assert child.stdout is not None
            for raw in child.stdout:
                line = raw.decode(errors="replace")
                logf.write(line)
                if STEP_RE.match(line):
                    steps += 1
                    if progress is not None:
                        progress(steps, expected, time.monotonic() - t0)
                if time.monotonic() - t0 > BUILD_TIMEOUT_S:
                    raise TimeoutExpired(list(argv), BUILD_TIMEOUT_S)
            rc = child.wait()
        except BaseException:
            stop_group(child)
            raise
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
        raise CommandError(list(argv), rc, tail)
    return steps


@dataclass(frozen=True)
class BuiltKernel:
    label: str
    key: str
    directory: Path
    meta: dict[str, Any]
    cache_hit: bool

    @property
    def bzimage(self) -> Path:
        return self.directory / "bzImage"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def release(self) -> str:
        return str(self.meta["release"])


def load_built(directory: Path, label: str) -> BuiltKernel | None:
    """A complete cache entry (meta.json written last, bzImage matching it), or None."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        ok = file_sha256(directory / "bzImage") == meta["bzimage_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return BuiltKernel(label, directory.name, directory, meta, True) if ok else None


def collect(plan: BuildPlan, work: Path, stage: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Copy what a lab host boots (and what explains it) into stage; returns meta."""
    build = work / "build"
    shutil.copyfile(build / "arch" / "x86" / "boot" / "bzImage", stage / "bzImage")
    shutil.copyfile(build / ".config", stage / "config")
    shutil.copyfile(build / "System.map", stage / "System.map")
    release = kernels.bzimage_release((stage / "bzImage").read_bytes()[:65536])
    return {
        "key": plan.key(),
        "label": plan.label,
        "release": release,
        "origin": f"source:{plan.source.origin}",
        "tree_sha256": plan.source.digest,
        "patches": [p.record() for p in plan.patches],
        "config": {
            "base": plan.base,
            "base_sha256": plan.base_sha256,
            "fragments": [str(f) for f in plan.fragments],
            "fragment_sha256s": list(plan.fragment_sha256s),
        },
        "config_sha256": sha256_file(stage / "config"),
        "bzimage_sha256": sha256_file(stage / "bzImage"),
        "toolchain": dict(plan.toolchain),
        "localversion": plan.localversion(),
        **stats,
    }


def ccache_counts(env: dict[str, str]) -> dict[str, int]:
    """Hits and misses so far in CCACHE_DIR (`ccache --print-stats`, ccache >= 3.7)."""
    cp = run(["ccache", "--print-stats"], env=env, timeout_s=60, check=False)
    got = dict(ln.split("\t", 1) for ln in cp.stdout.splitlines() if "\t" in ln)
    hits = sum(int(got.get(k, 0)) for k in ("direct_cache_hit", "preprocessed_cache_hit"))
    return {"hits": hits, "misses": int(got.get("cache_miss", 0))}


def build(
    entry: SourceKernel,
    *,
    cache: Path | None = None,
    force: bool = False,
    jobs: int | None = None,
    progress: ProgressFn | None = None,
) -> BuiltKernel:
    """Build (or find in the cache) one source entry's kernel.

    Raises SourceMissing, PatchError, ConfigLacks, UsageError (bad paths) before
    anything enters builds/; CommandError when make fails (its log's tail)."""
    cache = (cache or cache_root()).resolve()
    plan = make_plan(entry, cache, fetch=True)
    key = plan.key()
    final = cache / "builds" / key
    if not force and (hit := load_built(final, entry.label)) is not None:
        return hit
    work = cache / "work" / plan.source.ident
    env = build_env(cache)
    with locked(cache / "work" / f"{plan.source.ident}.lock"):
        if not force and (hit := load_built(final, entry.label)) is not None:
            return hit  # another builder finished it while we waited
        t0 = time.monotonic()
        prepare_source(work, plan.source, plan.patches)
        configure(plan, work, env)
        (cache / "builds").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache / "builds", prefix=f".tmp-{key[:12]}-") as t:
            stage = Path(t)
            expected = last_steps(work)
            t1 = time.monotonic()
            before = ccache_counts(env)
            argv = make_argv(plan, work, ["bzImage"], jobs or os.cpu_count() or 1)
            steps = run_build(argv, stage / "build.log", env, progress, expected)
            (work / "last-steps").write_text(f"{steps}\n")
            after = ccache_counts(env)
            stats = {
                "build_s": round(time.monotonic() - t1, 1),
                "total_s": round(time.monotonic() - t0, 1),
                "steps": steps,
                "ccache": {k: after[k] - before[k] for k in after},
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            meta = collect(plan, work, stage, stats)
            (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)  # forced rebuild (or a corrupt entry)
            os.rename(stage, final)
    return BuiltKernel(entry.label, key, final, meta, False)


def bindeb(
    entry: SourceKernel, dest: Path, *, cache: Path | None = None, jobs: int | None = None
) -> list[Path]:
    """`make bindeb-pkg` from a source entry's tree, patches and config (the build the
    cache holds, so make finds little to do): the .debs, copied into dest. They boot as
    a `deb:` entry (everything is built in: no modules, no initramfs)."""
    cache = (cache or cache_root()).resolve()
    plan = make_plan(entry, cache, fetch=True)
    work = cache / "work" / plan.source.ident
    env = build_env(cache)
    dest.mkdir(parents=True, exist_ok=True)
    with locked(cache / "work" / f"{plan.source.ident}.lock"):
        prepare_source(work, plan.source, plan.patches)
        configure(plan, work, env)
        for old in work.glob("linux-*"):  # the last packaging's .debs, .buildinfo, .changes
            if old.is_file():
                old.unlink()
        argv = make_argv(plan, work, ["bindeb-pkg"], jobs or os.cpu_count() or 1)
        run_build(argv, dest / "bindeb-pkg.log", env, None, None)
        debs = sorted(work.glob("linux-*.deb"))
        for d in debs:
            shutil.copyfile(d, dest / d.name)
    if not any(d.name.startswith("linux-image-") for d in debs):
        raise HostError(f"make bindeb-pkg made no linux-image .deb in {work}")
    return [dest / d.name for d in debs]


def last_steps(work: Path) -> int | None:
    """Steps of the last full build in this tree: the denominator shown in progress."""
    try:
        return int((work / "last-steps").read_text())
    except (OSError, ValueError):
        return None


def find_built(entry: SourceKernel, cache: Path | None = None) -> BuiltKernel:
    """The cached build of a source entry (no build, no download); HostError if none."""
    cache = (cache or cache_root()).resolve()
    plan = make_plan(entry, cache, fetch=False)
    built = load_built(cache / "builds" / plan.key(), entry.label)
    if built is None:
        raise HostError(f"kernel {entry.label}: not built yet ({plan.key()[:12]}): {BUILD_HINT}")
    return built


# ---------------------------------------------------------------- what a lab host boots


@dataclass(frozen=True)
class Bootable:
    """A kernel outside the lab image's manifest, ready for direct kernel boot."""

    label: str
    release: str
    vmlinuz: Path
    initrd: Path | None
    origin: str
    record: dict[str, Any]
    config: Path | None = None  # its .config, where one came with it

    def lacks(self, needs: Sequence[str]) -> list[str]:
        """The options of needs ("A|B": either) its config does not set to y; every one
        when there is no config to read."""
        have = kernels.parse_kconfig(self.config.read_text()) if self.config else {}
        return [n for n in needs if not any(have.get(o) == "y" for o in n.split("|"))]


def build_dir_kernel(entry: BuildKernel) -> Bootable:
    """A built tree (or a kbuild cache entry): bzImage and .config, everything built in."""
    d = Path(entry.build).resolve()
    image = next(
        (p for p in (d / "arch" / "x86" / "boot" / "bzImage", d / "bzImage") if p.is_file()), None
    )
    config = next((p for p in (d / ".config", d / "config") if p.is_file()), None)
    if image is None:
        raise UsageError(f"kernel {entry.label}: build: {entry.build}: no bzImage in it")
    release = kernels.bzimage_release(image.read_bytes()[:65536])
    origin = f"build:{d}"
    record: dict[str, Any] = {
        "name": entry.label,
        "release": release,
        "origin": origin,
        "config_sha256": sha256_file(config) if config else None,
        "bzimage_sha256": sha256_file(image),
        "tree_sha256": None,
        "patches": [],
    }
    meta = d / "meta.json"
    if meta.is_file():  # a kbuild cache entry knows where it came from
        m = json.loads(meta.read_text())
        record.update(tree_sha256=m.get("tree_sha256"), patches=m.get("patches", []))
    return Bootable(entry.label, release, image, None, origin, record, config)


def deb_kernel(entry: DebKernel, cache: Path | None = None) -> Bootable:
    """linux-image-*.deb from `make bindeb-pkg`, unpacked once into the cache. Only a
    kernel with everything built in boots this way (no initramfs, no modules)."""
    debs = [Path(p).resolve() for p in entry.deb]
    for p in debs:
        if not p.is_file():
            raise UsageError(f"kernel {entry.label}: deb: {p}: no such file")
    image = [p for p in debs if p.name.startswith("linux-image-") and "-dbg" not in p.name]
    if len(image) != 1:
        raise UsageError(f"kernel {entry.label}: deb: expected one linux-image-*.deb")
    digest = file_sha256(image[0])
    dest = (cache or cache_root()).resolve() / "debs" / digest[:16]
    release = deb_release(image[0])
    if not (dest / "vmlinuz").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)  # extract_boot_files unpacks beside
        kernels.extract_boot_files(debs, release, dest)
    origin = f"deb:{image[0]}"
    record: dict[str, Any] = {
        "name": entry.label,
        "release": release,
        "origin": origin,
        "config_sha256": sha256_file(dest / "config"),
        "deb_sha256s": {p.name: file_sha256(p) for p in debs},
        "tree_sha256": None,
        "patches": [],
    }
    config = dest / "config"
    return Bootable(
        entry.label,
        release,
        dest / "vmlinuz",
        None,
        origin,
        record,
        config if config.is_file() else None,
    )


def deb_release(deb: Path) -> str:
    """The release a linux-image .deb installs: the name of its boot/vmlinuz-<release>.
    UsageError when it ships modules: those need an initramfs or the lab image rebuilt
    with the package installed, which this direct boot does not do."""
    members = kernels.deb_members(deb)
    if any(m.endswith((".ko", ".ko.xz", ".ko.zst")) for m in members):
        raise UsageError(f"{deb}: ships modules: only kernels with everything built in boot here")
    for member in members:
        if m := re.fullmatch(r"boot/vmlinuz-(.+)", member):
            return m[1]
    raise UsageError(f"{deb}: holds no boot/vmlinuz-*: not a linux-image package")


def bootable(entry: KernelEntry, cache: Path | None = None) -> Bootable | None:
    """A kernel the lab host boots directly; None for a label of the lab image."""
    if isinstance(entry, str):
        return None
    if isinstance(entry, SourceKernel):
        b = find_built(entry, cache)
        record = {
            "name": entry.label,
            "release": b.release,
            "origin": b.meta["origin"],
            "config_sha256": b.meta["config_sha256"],
            "tree_sha256": b.meta["tree_sha256"],
            "patches": b.meta["patches"],
            "build_key": b.key,
        }
        origin = str(b.meta["origin"])
        return Bootable(entry.label, b.release, b.bzimage, None, origin, record, b.config)
    if isinstance(entry, BuildKernel):
        return build_dir_kernel(entry)
    return deb_kernel(entry, cache)


def build_all(
    entries: Sequence[KernelEntry],
    *,
    force: bool = False,
    progress: Callable[[str], ProgressFn | None] | None = None,
) -> list[BuiltKernel | Bootable]:
    """Build every source entry, check every build/deb entry; labels must be unique."""
    labels = [e if isinstance(e, str) else e.label for e in entries]
    if dup := sorted({x for x in labels if labels.count(x) > 1}):
        raise UsageError(f"kernels: label {', '.join(dup)} given twice")
    out: list[BuiltKernel | Bootable] = []
    for e in entries:
        if isinstance(e, SourceKernel):
            out.append(build(e, force=force, progress=progress(e.label) if progress else None))
        elif (b := bootable(e)) is not None:
            out.append(b)
    return out
