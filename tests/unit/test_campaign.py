"""`densitylab report results/*`: runs of one spec combined, specs side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import report
from orchestrator.errors import UsageError
from orchestrator.results import campaign
from tests.synthetic import make_run


def test_runs_grouped_by_spec_hash(tmp_path: Path) -> None:
    a1 = make_run(tmp_path, run_id="a1", latency_samples=2_000)
    a2 = make_run(tmp_path, run_id="a2", latency_samples=2_000, seed=1)
    b = make_run(tmp_path, run_id="b", spec_name="other-spec", latency_samples=2_000)
    groups = campaign.group_runs([a1, b, a2])
    assert [(g.spec_name, [p.name for p in g.runs]) for g in groups] == [
        ("ab-ksm-walk", ["a1", "a2"]),
        ("other-spec", ["b"]),
    ]
    # The same name with another spec text is another spec: the hash decides.
    m = json.loads((a2 / "manifest.json").read_text())
    (a2 / "manifest.json").write_text(json.dumps(m | {"spec_sha256": "f" * 64}))
    assert len(campaign.group_runs([a1, a2])) == 2
    with pytest.raises(UsageError, match="given twice"):
        campaign.group_runs([a1, a1])


def test_campaign_report_combines_one_spec_and_sets_specs_side_by_side(tmp_path: Path) -> None:
    runs = tmp_path / "results"
    dirs = [
        make_run(runs, run_id="a1", latency_samples=2_000),
        make_run(runs, run_id="a2", latency_samples=2_000, seed=1),
        make_run(runs, run_id="b", spec_name="other-spec", latency_samples=2_000),
    ]
    paths = report.write_campaign(sorted(runs.iterdir()), tmp_path / "out")
    md = paths.summary_md.read_text()
    groups = campaign.group_runs(dirs)
    assert all(f"{g.slug}/summary.md" in md for g in groups)
    assert "saved per guest, general_profit (MiB)" in md
    combined = (tmp_path / "out" / groups[0].slug / "summary.md").read_text()
    assert "a1" in combined and "a2" in combined  # one spec: one analysis of both runs
    table = pd.read_csv(paths.tables["campaign_metrics"])
    assert set(table["spec_name"]) == {"ab-ksm-walk", "other-spec"}
    assert (table.loc[table["spec_name"] == "ab-ksm-walk", "runs"] == 2).all()
    per_guest = table[table["metric"].str.startswith("saved per guest")]
    # N guests of 160 MiB identical pages save ~(N - 1)/N x 160 MiB per guest, either spec.
    for _, row in per_guest.iterrows():
        expect = (row["fleet_size"] - 1) / row["fleet_size"] * 160
        assert row["median"] == pytest.approx(expect, rel=0.1)
    assert "<a href=" in paths.index_html.read_text()


def test_one_spec_is_a_plain_report(tmp_path: Path) -> None:
    run = make_run(tmp_path, latency_samples=2_000)
    paths = report.write_campaign([run], tmp_path / "out")
    assert paths.summary_md.name == "summary.md" and paths.analysis is not None
