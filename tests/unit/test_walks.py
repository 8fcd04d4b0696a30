"""The walk table read out of core (orchestrator.results.analysis.walks): every walk up
to the cap, a fixed-seed sample above it, true counts either way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import UsageError
from orchestrator.results import analysis as an
from orchestrator.results.analysis import walks
from tests.synthetic import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> an.Run:
    return an.load_run(make_run(tmp_path_factory.mktemp("walks"), latency_samples=60_000))


def _ok(run: an.Run) -> set[str]:
    return set(an.successful(an.trial_metrics(run))["trial_id"])


def test_under_the_cap_every_walk_is_read(run: an.Run) -> None:
    lat = run.latency
    assert lat is not None
    ok = lat[lat["trial_id"].astype(str).isin(_ok(run))]
    w = walks.read_walks(run, walks.walk_combos(run, _ok(run)))  # type: ignore[arg-type]
    assert w.n == len(ok) == len(w.lat) and not w.sampled
    assert w.n_unattributed == int((ok["target_kind"] == "unattributed").sum())
    mine = np.sort(w.lat["duration_ns"].to_numpy())
    assert np.array_equal(mine, np.sort(ok["duration_ns"].to_numpy()))
    assert sum(w.counts.values()) == w.n


def test_over_the_cap_a_fixed_sample_with_true_counts(run: an.Run) -> None:
    combos = walks.walk_combos(run, _ok(run))
    assert combos is not None
    cap = 300
    a = walks.read_walks(run, combos, cap=cap)
    b = walks.read_walks(run, combos, cap=cap)

    def rows(w: walks.Walks) -> object:  # DuckDB returns rows in any order
        return w.lat.sort_values(list(w.lat.columns)).reset_index(drop=True)

    assert rows(a).equals(rows(b))  # the same run directories: the same sample
    assert a.sampled and a.n == sum(a.counts.values())
    per_row = a.lat.groupby(list(walks.KEYS), observed=True).size()
    big = [k for k in a.sampled if k in per_row.index]
    assert big and all(0.7 * cap < per_row[k] < 1.3 * cap for k in big)
    # The sample's median walk is near every walk's (lognormal sigma 0.35: within ~10%;
    # the unattributed rows mix two VMA levels, a median with a gap under it: left out).
    full = walks.read_walks(run, combos)
    for k in [k for k in big if k[2] != "unattributed"]:
        sel = tuple(full.lat[c].astype(str) == v for c, v in zip(walks.KEYS, k, strict=True))
        mask = np.logical_and.reduce(sel)
        m_full = np.median(full.lat.loc[mask, "duration_ns"])
        s = tuple(a.lat[c].astype(str) == v for c, v in zip(walks.KEYS, k, strict=True))
        m_sample = np.median(a.lat.loc[np.logical_and.reduce(s), "duration_ns"])
        assert m_sample == pytest.approx(m_full, rel=0.1)


def test_sampled_rows_state_n_and_n_sampled(run: an.Run) -> None:
    tm = an.trial_metrics(run)
    lat = an.analyze_latency(run, tm, an.kernel_order(run), rng=np.random.default_rng(0), cap=300)
    assert lat is not None and lat.sampled_rows > 0
    s = lat.summary
    assert (s["n"] >= s["n_sampled"]).all() and (s["n"] > s["n_sampled"]).any()
    assert any("sample" in w for w in an.hygiene_warnings(run, tm, lat))


def test_an_unreadable_walk_table_names_the_file(tmp_path: Path) -> None:
    run = an.load_run(make_run(tmp_path, latency_samples=2_000))
    path = run.parts["latency"][0].path
    path.write_bytes(path.read_bytes()[:200])  # truncated after the run was loaded
    with pytest.raises(UsageError, match=str(path)):
        walks.walk_combos(run, _ok(run))


def test_walks_without_a_duration_count_nowhere(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = make_run(tmp_path, latency_samples=3_000)
    path = run_dir / "latency.parquet"
    table = pq.read_table(path)
    dur = table.column("duration_ns").to_numpy().copy()
    untimed = np.zeros(len(dur), dtype=bool)
    untimed[::10] = True
    i = table.schema.get_field_index("duration_ns")
    pq.write_table(table.set_column(i, "duration_ns", pa.array(dur, mask=untimed)), path)
    run = an.load_run(run_dir)
    ok = _ok(run)
    w = walks.read_walks(run, walks.walk_combos(run, ok))  # type: ignore[arg-type]
    trial = table.column("trial_id").to_pandas().astype(str).isin(ok).to_numpy()
    assert w.n == len(w.lat) == int((trial & ~untimed).sum())
