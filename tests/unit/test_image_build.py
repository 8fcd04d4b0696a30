"""The reuse-or-build skeleton the three image builders share, with a stand-in assemble
that writes the tiny image's two artifacts (real files, the real loader)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.errors import HostError
from orchestrator.images import (
    TinyImage,
    artifact_record,
    build_lock,
    find_current,
    load_image,
    reuse_or_build,
)

KEY = "ab" * 32


class Assembler:
    """Writes vmlinuz and initrd.img into work/out; counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, work: Path) -> dict[str, object]:
        self.calls += 1
        out = work / "out"
        out.mkdir()
        (out / "build.log").write_text("step 1\nstep 2 failed\n")
        if self.fail:
            raise RuntimeError("step 2 failed")
        for name in ("vmlinuz", "initrd.img"):
            (out / name).write_bytes(f"{name} {self.calls}".encode())
        names = ("vmlinuz", "initrd.img")
        return {"key": KEY, "artifacts": {n: artifact_record(out / n) for n in names}}


def build(
    kind: Path, assemble: Assembler, *, force: bool = False, failure_log: str | None = None
) -> TinyImage:
    with build_lock(kind):
        return reuse_or_build(
            kind, "test image", KEY, load_image, assemble, force=force, failure_log=failure_log
        )


def test_builds_once_then_reuses(tmp_path: Path) -> None:
    kind, assemble = tmp_path / "kind", Assembler()
    first = build(kind, assemble)
    assert not first.cache_hit and first.key == KEY and first.kernel == kind / KEY / "vmlinuz"
    manifest = json.loads(first.manifest.read_text())
    assert isinstance(manifest["build_s"], float)
    assert (kind / "current").resolve() == kind / KEY
    again = build(kind, assemble)
    assert again.cache_hit and again.kernel == first.kernel and assemble.calls == 1
    assert [p.name for p in kind.iterdir() if p.name.startswith(".build-")] == []


def test_force_and_a_changed_artifact_rebuild(tmp_path: Path) -> None:
    kind, assemble = tmp_path / "kind", Assembler()
    build(kind, assemble)
    assert not build(kind, assemble, force=True).cache_hit
    (kind / KEY / "initrd.img").write_bytes(b"not what the manifest says")
    assert not build(kind, assemble).cache_hit
    assert assemble.calls == 3
    assert load_image(kind / KEY, verify=True) is not None


def test_a_failed_build_keeps_its_log_and_nothing_else(tmp_path: Path) -> None:
    kind = tmp_path / "kind"
    with pytest.raises(RuntimeError, match="step 2"):
        build(kind, Assembler(fail=True), failure_log="build.log")
    assert (kind / "last-failed-build.log").read_text().endswith("step 2 failed\n")
    assert sorted(p.name for p in kind.iterdir()) == [".lock", "last-failed-build.log"]


def test_find_current_says_how_to_build_then_finds_the_build(tmp_path: Path) -> None:
    kind = tmp_path / "kind"
    with pytest.raises(HostError, match=r"no test image in .*kind: run make it"):
        find_current(kind, load_image, "test image", "run make it")
    built = build(kind, Assembler())
    assert find_current(kind, load_image, "test image", "hint") == replace(built, cache_hit=True)
