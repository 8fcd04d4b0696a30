"""The run-directory schema against its writers and readers: the writers' columns are the
schema's, the store holds tables to it, and manifests of every readable version read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from orchestrator import checks, manifest, runner, sampling, store
from orchestrator.errors import UsageError
from orchestrator.results import schema
from tests.synthetic import make_run

SAMPLE = {
    "ts_ns": 5_000,
    "ksm": {c: 1 for c in sampling.KSM_COLUMNS} | {"general_profit": 4096},
    "ksmd_cpu_s": 0.5,
    "meminfo_kib": {"MemFree": 1, "MemAvailable": 2},
    "vmstat": {"pswpout": 3},
    "processes": {"g0": {"pid": 7, "ram_vmas": 1}},
}
MARKS = [sampling.PhaseMark("boot", 0)]


def test_the_writers_columns_are_the_schemas() -> None:
    built = {
        "ksm_samples": sampling.ksm_table([SAMPLE], "t", 0, MARKS),
        "vmstat_samples": sampling.vmstat_table([SAMPLE], "t", 0, MARKS),
        "process_samples": sampling.process_table([SAMPLE], "t", 0, MARKS),
    }
    for name, df in built.items():
        assert set(df.columns) == set(schema.table(name).names), name
    assert {f.name for f in dataclasses.fields(runner.TrialResult)} == set(schema.TRIALS.names)
    for name, df in checks.tables([]).items():
        assert set(df.columns) == set(schema.table(name).names), name


def test_store_conforms_tables_at_write_time(tmp_path: Path) -> None:
    st = store.RunStore.create(tmp_path, "s", run_id="r-0001")
    # A trial that recorded no reason and no walk count: typed nulls, not untyped ones.
    trials = pd.DataFrame(
        [{"trial_id": "t", "kernel": "k", "fleet_size": 1, "status": "ok", "reason": None}]
    ).assign(walks=pd.Series([None], dtype=object))
    st.write_trial_tables("t", {"trials": trials})
    arrow = pq.read_schema(st.trial_dir("t") / "trials.parquet")
    assert str(arrow.field("reason").type) in ("string", "large_string")
    assert str(arrow.field("walks").type) == "int64"
    with pytest.raises(schema.SchemaError, match=r"latency.parquet: missing required .*method"):
        st.write_trial_tables("t", {"latency": pd.DataFrame({"trial_id": ["t"], "kernel": "k"})})
    with pytest.raises(KeyError, match="no table 'nonsense'"):
        st.write_trial_tables("t", {"nonsense": trials})
    st.write_manifest({"run_id": "r-0001", "spec_name": "s", "trials": []})
    assert st.read_manifest()["schema_version"] == schema.SCHEMA_VERSION


def test_manifests_of_every_readable_version_read(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    data = json.loads((run / "manifest.json").read_text())
    assert manifest.load_manifest(run)["schema_version"] == schema.SCHEMA_VERSION
    legacy = {k: v for k, v in data.items() if k != "schema_version"}
    (run / "manifest.json").write_text(json.dumps(legacy))
    assert schema.manifest_version(manifest.load_manifest(run)) == schema.LEGACY_VERSION
    (run / "manifest.json").write_text(json.dumps(data | {"schema_version": 99}))
    with pytest.raises(UsageError, match=r"manifest.json: schema_version: .*reads schema versions"):
        manifest.load_manifest(run)


def test_a_swept_trials_knobs_are_written_to_the_schema(tmp_path: Path) -> None:
    """The engine's trial tables for a trial of a swept spec: trials.ksm_setting and one
    ksm_settings row per knob, as asked and as the host reported it, swept or not."""
    from orchestrator import plan
    from orchestrator.engine.state import TrialResult, TrialState
    from orchestrator.engine.tables import trial_tables
    from orchestrator.spec import load_spec_text

    spec, _ = load_spec_text("name: a\nksm: {pages_to_scan: [100, 5000], sleep_millisecs: 20}", "x")
    trial = plan.expand(spec)[1]
    st = TrialState(ksm_requested={k: str(v) for k, v in trial.knobs.items()})
    st.ksm_swept, st.ksm_knobs = trial.ksm_swept, {"pages_to_scan": "5000", "sleep_millisecs": "20"}
    res = TrialResult(trial.trial_id, "running", "6.18", 1, 0, "tcg", 256, 64)
    res.ksm_setting = trial.ksm_setting
    tables = trial_tables(st, res)
    assert set(tables["ksm_settings"].columns) == set(schema.KSM_SETTINGS.names)
    run = store.RunStore.create(tmp_path, "a", run_id="r-0002")
    run.write_trial_tables(trial.trial_id, tables)
    knobs = pd.read_parquet(run.trial_dir(trial.trial_id) / "ksm_settings.parquet")
    assert knobs.set_index("knob")["in_force"].to_dict() == st.ksm_knobs
    assert knobs.set_index("knob")["swept"].to_dict() == {
        "pages_to_scan": True,
        "sleep_millisecs": False,
    }
    trials = pd.read_parquet(run.trial_dir(trial.trial_id) / "trials.parquet")
    assert trials["ksm_setting"].tolist() == ["pages_to_scan=5000"]
