"""Loading run directories into Run objects, and combining runs.

The small tables (trials, guests, events, phase deltas) are read into pandas. The sample
tables, which grow with the length of a run (KSM, vmstat and process samples, walks), are
not: a Run holds their parquet files (Parts), checked for the schema's required columns,
and the analysis reads them one run file at a time (KSM, vmstat) or out of core with
DuckDB (walks, orchestrator.results.analysis.walks). Run.ksm, .vmstat, .processes and
.latency still read a whole table into pandas, for tests and small runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.errors import UsageError
from orchestrator.results import schema
from orchestrator.results.analysis.common import OPTIONAL_TRIAL_COLUMNS, _isin
from orchestrator.results.analysis.labels import normalise_latency

log = logging.getLogger(__name__)

__all__ = [
    "REQUIRED_COLUMNS",
    "RUN_FIELDS",
    "SAMPLE_FIELDS",
    "TABLE_FILES",
    "Part",
    "Run",
    "combine_runs",
    "load_run",
]

# The Run's fields and the schema's tables they hold (orchestrator.results.schema).
RUN_FIELDS = {
    "trials": schema.TRIALS,
    "ksm": schema.KSM_SAMPLES,
    "vmstat": schema.VMSTAT_SAMPLES,
    "processes": schema.PROCESS_SAMPLES,
    "guests": schema.GUESTS,
    "events": schema.EVENTS,
    "latency": schema.LATENCY,
    "phase_deltas": schema.PHASE_DELTAS,
}
SAMPLE_FIELDS = tuple(k for k, t in RUN_FIELDS.items() if t.sample)
TABLE_FILES = {k: t.file for k, t in RUN_FIELDS.items()}
REQUIRED_COLUMNS = {k: t.required for k, t in RUN_FIELDS.items()}


@dataclass(frozen=True)
class Part:
    """One run's parquet file of a sample table. prefix is put before its trial ids (runs
    combined whose trial ids collide); columns are those the file has."""

    path: Path
    name: str  # the Run field: "ksm", "vmstat", "processes", "latency"
    columns: tuple[str, ...]
    rows: int
    prefix: str = ""

    def read(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The file's rows in pandas (string columns of sample tables as categoricals),
        only `columns` (those the file has) when given, trial ids prefixed.

        Raises UsageError naming the file when it cannot be read."""
        cols = [c for c in (columns or self.columns) if c in self.columns]
        df = _read_table(self.path, self.name, cols)
        return _prefix_trials(df, self.prefix) if self.prefix else df


@dataclass(frozen=True)
class Run:
    """One run directory (or several combined): its manifest, its small tables (None: not
    recorded in this run) and the parquet files of its sample tables."""

    run_dir: Path
    manifest: dict[str, Any]
    trials: pd.DataFrame
    guests: pd.DataFrame | None = None
    events: pd.DataFrame | None = None
    phase_deltas: pd.DataFrame | None = None
    parts: dict[str, tuple[Part, ...]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        """The sample table name was recorded and holds rows."""
        return self.rows(name) > 0

    def rows(self, name: str) -> int:
        return sum(p.rows for p in self.parts.get(name, ()))

    def frames(self, name: str, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """Sample table name one run file at a time (a trial's rows are all in one file),
        so memory holds the largest run's table, not every run's."""
        parts = [p for p in self.parts.get(name, ()) if p.rows]
        for i, part in enumerate(parts, 1):
            log.info("%s: %s (%d of %d, %s rows)", name, part.path, i, len(parts), f"{part.rows:,}")
            yield part.read(columns)

    def _whole(self, name: str) -> pd.DataFrame | None:
        frames = [p.read() for p in self.parts.get(name, ())]
        return _concat(frames) if frames else None

    @property
    def ksm(self) -> pd.DataFrame | None:
        """Every KSM sample in pandas (tests, small runs; the analysis uses frames)."""
        return self._whole("ksm")

    @property
    def vmstat(self) -> pd.DataFrame | None:
        return self._whole("vmstat")

    @property
    def processes(self) -> pd.DataFrame | None:
        return self._whole("processes")

    @property
    def latency(self) -> pd.DataFrame | None:
        """Every walk in pandas, normalised (tests, small runs: the analysis reads walks
        out of core, orchestrator.results.analysis.walks)."""
        lat = self._whole("latency")
        if lat is None:
            return None
        if "lower_bound" not in lat.columns:
            lat["lower_bound"] = _isin(lat["method"], {"tracepoint-proxy"})
        return normalise_latency(lat)

    @property
    def run_id(self) -> str:
        return str(self.manifest.get("run_id") or self.run_dir.name)

    @property
    def spec_name(self) -> str | None:
        name = self.manifest.get("spec_name")
        return None if name is None else str(name)

    @property
    def manifests(self) -> list[dict[str, Any]]:
        """The manifests behind this Run (several when runs were combined)."""
        return list(self.manifest.get("combined_from") or [self.manifest])


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    from orchestrator.manifest import load_manifest  # validated: one line, never a traceback

    return load_manifest(run_dir)


def _open(path: Path, name: str) -> pq.ParquetFile:
    """The parquet file of table name, its required columns checked (schema only read).

    Raises UsageError naming the file when it cannot be read or lacks required columns."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"{path}: cannot read table: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in pf.schema_arrow.names]
    if missing:
        raise UsageError(f"{path}: missing column(s) {', '.join(missing)}")
    return pf


def _read_table(path: Path, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read one parquet table (only `columns` when given); string columns of sample tables
    become categoricals.

    Raises UsageError naming the file when it cannot be read or lacks required columns.
    """
    pf = _open(path, name)
    try:
        arrow = pf.schema_arrow
        strings = [f.name for f in arrow if pa.types.is_string(f.type)]
        strings += [f.name for f in arrow if pa.types.is_large_string(f.type)]
        if name != "trials":
            pf = pq.ParquetFile(path, read_dictionary=strings)
        # One column at a time: the Arrow copy of a column is freed before the next is
        # read, so peak memory stays near the DataFrame's own size (10M walks: ~0.5 GiB,
        # against ~1.2 GiB for read_table().to_pandas()).
        names = arrow.names if columns is None else list(columns)
        data = {c: pf.read(columns=[c]).column(0).to_pandas() for c in names}
        return pd.DataFrame(data, copy=False)
    except (OSError, pa.ArrowException) as e:
        raise UsageError(f"{path}: cannot read table: {e}") from e


def _part(path: Path, name: str) -> Part:
    meta = _open(path, name)
    return Part(path, name, tuple(meta.schema_arrow.names), meta.metadata.num_rows)


def _normalise_trials(trials: pd.DataFrame, run_id: str) -> pd.DataFrame:
    trials = trials.copy()
    for col in OPTIONAL_TRIAL_COLUMNS:
        if col not in trials.columns:
            text = col in ("reason", "accel", "kernel_release", "ksm_setting")
            trials[col] = pd.NA if text else np.nan
    trials["trial_id"] = trials["trial_id"].astype(str)
    trials["kernel"] = trials["kernel"].astype(str)
    trials["status"] = trials["status"].astype(str)
    trials["run_id"] = run_id
    return trials


def load_run(run_dir: Path | str) -> Run:
    """Load a run directory (results/<run_id>/). Only manifest.json and trials.parquet
    are required; a missing optional table becomes None.

    Raises UsageError naming the file when the manifest or trials table is missing or
    unreadable, or a table lacks a required column.
    """
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    trials_path = run_dir / TABLE_FILES["trials"]
    if not trials_path.is_file():
        raise UsageError(f"{trials_path}: missing; every run directory has a trials table")
    run_id = str(manifest.get("run_id") or run_dir.name)
    tables: dict[str, pd.DataFrame | None] = {}
    parts: dict[str, tuple[Part, ...]] = {}
    for name, file in TABLE_FILES.items():
        path = run_dir / file
        if name in SAMPLE_FIELDS:
            parts[name] = (_part(path, name),) if path.is_file() else ()
        else:
            tables[name] = _read_table(path, name) if path.is_file() else None
    trials_table = tables.pop("trials")
    assert trials_table is not None  # checked above
    trials = _normalise_trials(trials_table, run_id)
    return Run(run_dir=run_dir, manifest=manifest, trials=trials, parts=parts, **tables)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate tables, keeping categorical columns categorical (union of categories)."""
    cats = {c for f in frames for c in f.columns if isinstance(f[c].dtype, pd.CategoricalDtype)}
    for col in cats:
        union = pd.Index(sorted({v for f in frames if col in f for v in _categories(f[col])}))
        frames = [f.assign(**{col: f[col].astype(pd.CategoricalDtype(union))}) for f in frames]
    return pd.concat(frames, ignore_index=True)


def _categories(s: pd.Series) -> list[str]:
    if isinstance(s.dtype, pd.CategoricalDtype):
        return [str(c) for c in s.cat.categories]
    return [str(v) for v in s.unique()]


def _prefix_trials(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    if isinstance(df["trial_id"].dtype, pd.CategoricalDtype):
        cats = [prefix + str(c) for c in df["trial_id"].cat.categories]
        return df.assign(trial_id=df["trial_id"].cat.rename_categories(cats))
    return df.assign(trial_id=prefix + df["trial_id"].astype(str))


def combine_runs(runs: Sequence[Run]) -> Run:
    """One Run holding the tables of several runs. Trial ids that collide between runs are
    prefixed with "<run_id>/"; manifest["combined_from"] keeps every manifest.
    """
    if not runs:
        raise UsageError("no run directories given")
    if len(runs) == 1:
        return runs[0]
    ids = [set(r.trials["trial_id"]) for r in runs]
    clash = len(set().union(*ids)) < sum(len(i) for i in ids)
    tables: dict[str, pd.DataFrame | None] = {}
    for name in ("trials", "guests", "events", "phase_deltas"):
        frames = [getattr(r, name) for r in runs]
        if clash:
            frames = [
                None if f is None else _prefix_trials(f, f"{r.run_id}/")
                for f, r in zip(frames, runs, strict=True)
            ]
        present = [f for f in frames if f is not None]
        tables[name] = _concat(present) if present else None
    parts = {
        name: tuple(
            replace(p, prefix=f"{r.run_id}/{p.prefix}" if clash else p.prefix)
            for r in runs
            for p in r.parts.get(name, ())
        )
        for name in SAMPLE_FIELDS
    }
    names = {r.spec_name for r in runs}
    manifest = {
        "run_id": "+".join(r.run_id for r in runs),
        "spec_name": names.pop() if len(names) == 1 else None,
        "combined_from": [m for r in runs for m in r.manifests],
    }
    trials = tables.pop("trials")
    assert trials is not None  # every run has one
    return Run(run_dir=runs[0].run_dir, manifest=manifest, trials=trials, parts=parts, **tables)
