"""mremap-swap on the kernels built from source (experiments/patch-ab.yaml's pair:
tinyconfig + the lab fragment, so the classic LRU, no MGLRU): merged pages moved with
mremap reach swap through memory.reclaim and read back intact on both. Before dlcheck
read memory.stat between its reclaim tries, both swapped 0 of 4096 (README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import kbuild
from orchestrator.spec import load_spec
from tests.system.test_kbuild_boot import need_tools

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SPEC = """\
name: mremap-swap-built
host: {kind: labvm, memory_mib: 2048, vcpus: 2, numa_cells: 2}
kernels:
  - label: base
    source: {debian: linux-source-6.12}
    config: {base: tinyconfig}
  - label: patched
    source: {debian: linux-source-6.12}
    patches: [experiments/patches]
    config: {base: tinyconfig}
ksm: {pages_to_scan: 2000, sleep_millisecs: 20}
checks: [mremap-swap]
"""


def test_mremap_swap_passes_on_the_built_pair(tmp_path: Path, host_untouched) -> None:
    spec = tmp_path / "built.yaml"
    spec.write_text(SPEC)
    s, _, _ = load_spec(spec)
    need_tools()
    # A cold machine builds the pair here (~5 min for base, then ccache makes the patched
    # one quick); test_kbuild_boot and patch-ab find them in the cache afterwards.
    kbuild.build_all(s.kernels)
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "check", str(spec), "--results",
         str(tmp_path / "r")],
        capture_output=True, text=True, timeout=900, cwd=REPO, check=False,
    )  # fmt: skip
    print(cp.stdout)
    (run,) = list((tmp_path / "r").iterdir())
    table = pd.read_parquet(run / "checks.parquet").set_index("kernel")
    assert (table.status == "PASS").all(), table.reason.to_dict()
    assert cp.returncode == 0, cp.stderr
    figs = pd.read_parquet(run / "check_figures.parquet")
    for kernel in ("base", "patched"):
        f = figs[figs.kernel == kernel].set_index("figure")["value"]
        assert f["swapped_out"] == f["pages"] and f["mismatched_pages"] == 0
        assert f["reclaim_tries"] >= 2  # the first try only activates the merged pages
