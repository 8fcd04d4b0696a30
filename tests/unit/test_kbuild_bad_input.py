"""Issue 10's bad input for `densitylab kernels build`, through the real CLI: a broken
patch and a missing source tree are each one line on stderr, exit 2, and leave nothing
in the kbuild cache's builds/. (A config lacking KSM is the system test
test_kbuild_boot.test_config_lacking_ksm_is_one_line_and_leaves_nothing, which needs a
real tree for olddefconfig; its error is a UsageError, so the CLI exits 2 too.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from orchestrator import kbuild
from orchestrator.errors import UsageError
from tests.unit.test_kbuild import PATCH, small_tree

REPO = Path(__file__).resolve().parents[2]


def kernels_build(spec: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, kbuild.CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "orchestrator.cli", "kernels", "build", str(spec)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def nothing_built(cache: Path) -> bool:
    builds = cache / "builds"
    return not builds.exists() or not any(builds.iterdir())


def spec_file(tmp: Path, kernel: str) -> Path:
    spec = tmp / "k.yaml"
    spec.write_text(f"name: k\nhost: {{kind: labvm}}\nkernels: [{kernel}]\n")
    return spec


def test_a_patch_that_does_not_apply_is_one_line_exit_2_nothing_built(tmp_path: Path) -> None:
    tree = small_tree(tmp_path)
    ksm = tree / "mm" / "ksm.c"
    ksm.write_text(ksm.read_text().replace("0, ULONG_MAX) {", "0, ULONG_MAX - 1) {"))
    spec = spec_file(tmp_path, f"{{label: p, source: {{tree: {tree}}}, patches: [{PATCH}]}}")
    cp = kernels_build(spec, tmp_path / "cache")
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"densitylab: {PATCH}: does not apply: ")
    assert "mm/ksm.c hunk #" in lines[0]
    assert nothing_built(tmp_path / "cache")


def test_a_missing_source_tree_is_one_line_exit_2_nothing_built(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-linux"
    spec = spec_file(tmp_path, f"{{label: m, source: {{tree: {missing}}}}}")
    cp = kernels_build(spec, tmp_path / "cache")
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densitylab: ")
    assert str(missing) in lines[0]
    assert nothing_built(tmp_path / "cache")


def test_a_config_lacking_ksm_is_a_usage_error() -> None:
    """So the CLI's fail() gives it exit 2 (the build itself is the system test)."""
    assert issubclass(kbuild.ConfigLacks, UsageError)
    assert issubclass(kbuild.SourceMissing, UsageError)
    assert issubclass(kbuild.PatchError, UsageError)
