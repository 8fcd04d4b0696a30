"""One smoke run with a `checks:` list, for real: the workload's saving counted page by
page (orchestrator.pagecount) lands beside the scramble's, within 2% of the pattern's
prediction, and the spec's checks run as part of the run into the same run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.store import sha256_file

pytestmark = [pytest.mark.system, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_smoke_with_checks_counts_pages_and_runs_checks(
    tiny_image, tmp_path: Path, host_untouched
) -> None:
    spec = tmp_path / "smoke-checks.yaml"
    spec.write_text((REPO / "experiments" / "smoke.yaml").read_text() + "checks: [ksm-stat]\n")
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(spec), "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO, check=False,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    t = pd.read_parquet(run / "trials.parquet").iloc[0]
    assert t.status == "successful" and t.saving_method == "pagemap"
    assert t.pagecount_saving_mib == pytest.approx(t.predicted_saving_mib, rel=0.02)
    pages = pd.read_parquet(run / "workload_pages.parquet")
    guests = pd.read_parquet(run / "guests.parquet")
    assert len(pages) == 4 and set(pages.guest) == set(guests.guest)
    assert (pages.method == "pagemap").all() and (pages.pages == 40960).all()
    # The dup pages (36,864 a guest) are KSM pages; the unique ones are not.
    assert (pages.ksm_pages >= 0.98 * 36864).all() and (pages.ksm_pages <= 40960).all()
    checks = pd.read_parquet(run / "checks.parquet")
    assert list(checks.check) == ["ksm-stat"] and checks.status.iloc[0] in ("PASS", "SKIP")
    manifest = json.loads((run / "manifest.json").read_text())
    for name in ("workload_pages.parquet", "checks.parquet", "check_figures.parquet"):
        assert manifest["files"][name] == sha256_file(run / name)
    assert manifest["check_results"][0]["check"] == "ksm-stat"
    assert (run / "checks" / "running.jsonl").read_text().count("\n") == 1
