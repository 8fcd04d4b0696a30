"""Kernel entries in specs and the parts of kbuild that need no compiler: patches applied
and reverted with the real `patch` in a small tree, cache keys, required options."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator import kbuild, labimage, plan
from orchestrator.errors import UsageError
from orchestrator.kernelspec import BuildKernel, SourceKernel, entry_for, labels
from orchestrator.spec import load_spec_text

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "experiments" / "patches" / "0001-ksm-rmap-walk-one-index.patch"
LAB = "name: t\nhost: {kind: labvm}\n"


def spec_with(kernels: str):
    return load_spec_text(LAB + "kernels: " + kernels + "\n", "t.yaml")[0]


def test_mixed_kernel_entries_keep_labels_in_order() -> None:
    s = spec_with(
        '["6.12", {label: base, source: {debian: linux-source-6.12}},'
        " {label: mine, build: /tmp/linux-out}, {label: pkg, deb: [a.deb]}]"
    )
    assert labels(s.kernels) == ["6.12", "base", "mine", "pkg"]
    assert isinstance(entry_for(s.kernels, "base"), SourceKernel)
    assert isinstance(entry_for(s.kernels, "mine"), BuildKernel)
    assert entry_for(s.kernels, "6.12") == "6.12"
    assert [t.kernel for t in plan.expand(s)] == ["6.12", "base", "mine", "pkg"]


@pytest.mark.parametrize(
    ("kernels", "message"),
    [
        ("[{label: a}]", "t.yaml: kernels.0: expected a label or a mapping with label"),
        (
            "[{label: a, source: {debian: linux-source-6.11}}]",
            "kernels.0.source-kernel.source.debian.debian: Input should be 'linux-source-6.12'",
        ),
        ("[{label: a, source: {}}]", "kernels.0.source-kernel.source: expected {tree: PATH}"),
        ("[{label: a, build: /x, deb: [y]}]", "kernels.0.build-kernel.deb: unknown key"),
        ("[{label: 'a b', build: /x}]", "kernels.0.build-kernel.label: label: use letters"),
        ("[{label: a, source: {tree: /t}, config: {bas: x}}]", "config.bas: unknown key"),
    ],
)
def test_bad_kernel_entries_are_one_line_naming_the_key(kernels: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        spec_with(kernels)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- patches in a real tree


def small_tree(root: Path) -> Path:
    """A tree shaped like the kernel's for what kbuild checks, holding the real mm/ksm.c
    lines the patch touches (taken from the patch's own context and '-' lines)."""
    tree = root / "linux"
    (tree / "mm").mkdir(parents=True)
    (tree / "Makefile").write_text("all:\n")
    (tree / "Kconfig").write_text("")
    (tree / "mm" / "other.c").write_text("untouched\n")
    orig = reconstruct_original(PATCH.read_text())
    (tree / "mm" / "ksm.c").write_text(orig)
    return tree


def reconstruct_original(patch: str) -> str:
    """The pre-image of a one-file patch, its hunks placed at their line numbers with
    filler lines between: `patch` then applies it with no offset."""
    lines: list[str] = []
    in_hunk = False
    for ln in patch.splitlines():
        if ln.startswith("@@"):
            start = int(ln.split()[1].split(",")[0][1:])
            lines += [f"/* filler {i} */" for i in range(len(lines) + 1, start)]
            in_hunk = True
        elif in_hunk and ln[:1] in (" ", "-"):
            lines.append(ln[1:])
        elif in_hunk and ln[:1] != "+":
            in_hunk = False
    return "\n".join(lines) + "\n"


def source_of(tree: Path) -> kbuild.SourceTree:
    return kbuild.tree_source(kbuild.TreeSource(tree=str(tree)))


def test_patch_applies_then_reverts_touching_only_its_files(tmp_path: Path) -> None:
    tree = small_tree(tmp_path)
    src = source_of(tree)
    work = tmp_path / "work"
    p = kbuild.expand_patches([str(PATCH.parent)])
    assert [x.path for x in p] == [PATCH]
    kbuild.prepare_source(work, src, p)
    patched = (work / "src" / "mm" / "ksm.c").read_text()
    assert "pgoff, pgoff) {" in patched and "linear_page_index = 0;" in patched
    assert patched.count("rmap_item->linear_page_index = 0;") == 3  # every exit
    other = work / "src" / "mm" / "other.c"
    mtime = other.stat().st_mtime_ns
    kbuild.prepare_source(work, src, ())  # back to base: the patch reverted in place
    assert (work / "src" / "mm" / "ksm.c").read_text() == (tree / "mm" / "ksm.c").read_text()
    assert other.stat().st_mtime_ns == mtime  # make would rebuild nothing else
    assert kbuild.read_state(work) == {"digest": src.digest, "applied": [], "clean": True}
    assert (tree / "mm" / "ksm.c").read_text() == reconstruct_original(PATCH.read_text())


def test_failing_patch_names_patch_and_first_hunk_and_leaves_tree(tmp_path: Path) -> None:
    tree = small_tree(tmp_path)
    ksm = tree / "mm" / "ksm.c"
    ksm.write_text(ksm.read_text().replace("0, ULONG_MAX) {", "0, ULONG_MAX - 1) {"))
    work = tmp_path / "work"
    src = source_of(tree)
    with pytest.raises(kbuild.PatchError) as e:
        kbuild.prepare_source(work, src, kbuild.expand_patches([str(PATCH)]))
    msg = str(e.value)
    assert msg.startswith(f"{PATCH}: does not apply: mm/ksm.c hunk #")
    assert "FAILED at line" in msg
    assert (work / "src" / "mm" / "ksm.c").read_text() == ksm.read_text()
    assert not list((work / "src").rglob("*.rej")) and not list((work / "src").rglob("*.orig"))
    assert kbuild.read_state(work)["clean"] is True


def test_first_failure_reads_real_patch_output(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a\nb\nc\n")
    bad = tmp_path / "bad.patch"
    bad.write_text("--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n-x\n+y\n c\n")
    cp = subprocess.run(
        kbuild.patch_argv(tmp_path, bad, dry=True), capture_output=True, text=True, check=False
    )
    assert cp.returncode != 0
    assert kbuild.first_failure(cp.stdout + cp.stderr) == "f hunk #1 FAILED at line 1"
    junk = tmp_path / "junk.patch"
    junk.write_text("hello\n")
    cp = subprocess.run(
        kbuild.patch_argv(tmp_path, junk, dry=True), capture_output=True, text=True, check=False
    )
    assert kbuild.first_failure(cp.stdout + cp.stderr) == "not a patch (no diff found)"


def test_missing_patch_and_tree_with_config_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"patches: nope\.patch: no such file"):
        kbuild.expand_patches(["nope.patch"])
    tree = small_tree(tmp_path)
    (tree / ".config").write_text("")
    with pytest.raises(UsageError, match="clean tree"):
        source_of(tree)


# ---------------------------------------------------------------- keys and config checks


def a_plan(tmp_path: Path, patches: tuple[kbuild.Patch, ...] = ()) -> kbuild.BuildPlan:
    src = kbuild.SourceTree("debian-x", "d" * 64, "debian:linux-source-6.12=1")
    frag = kbuild.LAB_FRAGMENT
    return kbuild.BuildPlan(
        "a", src, patches, "tinyconfig", None, (frag,), (kbuild.file_sha256(frag),),
        (("gcc", "gcc 12"),),
    )  # fmt: skip


def test_key_names_patches_and_toolchain_and_release_keeps_the_version(tmp_path: Path) -> None:
    base = a_plan(tmp_path)
    patched = a_plan(tmp_path, kbuild.expand_patches([str(PATCH)]))
    assert base.key() != patched.key()
    assert base.key() == a_plan(tmp_path).key()
    other_cc = kbuild.BuildPlan(**{**base.__dict__, "toolchain": (("gcc", "gcc 13"),)})
    assert other_cc.key() != base.key()
    assert base.localversion().startswith("+dl") and len(base.localversion()) == 13


def test_a_fragment_cannot_take_away_what_the_lab_needs(tmp_path: Path) -> None:
    frag = tmp_path / "mine.config"
    frag.write_text("# CONFIG_KSM is not set\nCONFIG_TRANSPARENT_HUGEPAGE=y\n")
    p = a_plan(tmp_path)
    p = kbuild.BuildPlan(
        **{**p.__dict__, "fragments": (*p.fragments, frag), "fragment_sha256s": ("x", "y")}
    )
    req = kbuild.required_options(p)
    assert req["CONFIG_KSM"] == "y"  # the lab's line wins: the config check then fails
    assert req["CONFIG_TRANSPARENT_HUGEPAGE"] == "y"
    assert {"CONFIG_KPROBE_EVENTS", "CONFIG_ZRAM", "CONFIG_MEMCG", "CONFIG_NUMA"} <= set(req)
    err = kbuild.ConfigLacks("a", ["CONFIG_KSM=y"], "tinyconfig")
    assert str(err) == (
        "kernel a: config lacks CONFIG_KSM=y after olddefconfig (base tinyconfig): "
        "a fragment unsets it or a dependency is missing"
    )


def test_build_dir_kernel_boots_without_initrd(tmp_path: Path) -> None:
    """A built tree's bzImage: release from its boot header, no -initrd on the QEMU line."""
    d = tmp_path / "out"
    (d / "arch" / "x86" / "boot").mkdir(parents=True)
    image = bytearray(4096)
    image[0x202:0x206] = b"HdrS"
    image[0x20E:0x210] = (0x400).to_bytes(2, "little")
    image[0x600 : 0x600 + 40] = b"6.12.117+dlabcdef0123 (gcc 12) #1 SMP\0".ljust(40, b"\0")
    (d / "arch" / "x86" / "boot" / "bzImage").write_bytes(bytes(image))
    (d / ".config").write_text("CONFIG_KSM=y\n")
    b = kbuild.build_dir_kernel(BuildKernel(label="mine", build=str(d)))
    assert (b.release, b.initrd) == ("6.12.117+dlabcdef0123", None)
    assert b.record["config_sha256"] == kbuild.file_sha256(d / ".config")
    k = labimage.LabKernel(b.label, b.release, b.vmlinuz, b.initrd, b.origin)
    img = labimage.LabImage(tmp_path / "rootfs.ext4", (), tmp_path / "m.json", "k" * 64, True)
    argv = labimage.kernel_args(labimage.BootPlan(img, k, tmp_path / "o", tmp_path / "s"))
    assert "-initrd" not in argv and argv[:2] == ["-kernel", str(b.vmlinuz)]


def test_cache_root_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kbuild.CACHE_ENV, "/tmp/elsewhere")
    assert kbuild.cache_root() == Path("/tmp/elsewhere")
    monkeypatch.delenv(kbuild.CACHE_ENV)
    assert kbuild.cache_root() == kbuild.DEFAULT_CACHE
    assert os.fspath(kbuild.DEFAULT_CACHE).startswith("/var/cache/")


def test_source_pair_diff_names_the_patch_under_study() -> None:
    from orchestrator.abdiff import source_pair_diff

    p = {"name": "0001-x.patch", "sha256": "a" * 64}
    base = {"name": "base", "tree_sha256": "t", "config_sha256": "c", "patches": []}
    patched = {**base, "name": "patched", "patches": [p]}
    assert source_pair_diff(base, patched) == {
        "kernel": "base",
        "patches_added": ["0001-x.patch"],
        "patches_removed": [],
        "same_tree": True,
        "same_config": True,
    }
    assert source_pair_diff(patched, {**base, "config_sha256": "d"})["same_config"] is False
