"""The run store: results/<run-id>/ with manifest.json and parquet tables.

Every file is written atomically (temp file in the same folder, then rename). Each
trial writes its own parts under trials/<trial-id>/; the run-level tables are rebuilt
from the parts after every trial, so a resumed run and a fresh one look the same.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import proc
from orchestrator.errors import CommandError, UsageError

# The run store's atomic writes and checksums are every module's: kept here under their
# old names for the store's callers.
from orchestrator.files import atomic_path as atomic_path
from orchestrator.files import sha256_file as sha256_file
from orchestrator.results import schema

TABLES = tuple(schema.RUN_TABLES)  # rebuilt from the trials' parts, in this order
# Written once per run, not per trial (orchestrator.checks): listed with their checksums.
ONCE_PER_RUN = ("checks", "check_figures")
FINISHED = ("successful",)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id(spec_name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{spec_name}-{secrets.token_hex(2)}"


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def conform(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """df checked against the schema of table name: a table with rows has every required
    column; a known column holding only nulls gets its schema dtype (an untyped null
    column would give the parquet file a type that depends on whether a trial happened
    to record a value). Columns the schema does not know pass through (newer writers).

    Raises schema.SchemaError naming the table and the missing columns."""
    spec = schema.TABLES.get(name)
    if spec is None or (df.empty and len(df.columns) == 0):
        return df
    missing = [c for c in spec.required if c not in df.columns]
    if missing and len(df):
        raise schema.SchemaError(name, f"missing required column(s) {', '.join(missing)}")
    casts = {
        c: schema.PANDAS_NULL_DTYPES[dtype]
        for c in df.columns
        if (dtype := spec.dtype(str(c))) is not None
        and df[c].dtype == object
        and df[c].isna().all()
    }
    return df.astype(casts) if casts else df


def write_table(path: Path, name: str, df: pd.DataFrame) -> None:
    """Write table name (see orchestrator.results.schema) atomically, conformed first."""
    write_parquet(path, conform(name, df))


def git_commit(repo: Path) -> str | None:
    """HEAD of the checkout at repo; None when there is none (an installed copy, no git)."""
    try:
        cp = proc.run(["git", "-C", str(repo), "rev-parse", "HEAD"], timeout_s=10, check=False)
    except (OSError, CommandError):  # no git (rc 127), or it hung
        return None
    return cp.stdout.strip() or None if cp.returncode == 0 else None


class RunStore:
    """One run directory."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def create(cls, results: Path, spec_name: str, run_id: str | None = None) -> RunStore:
        """A new run directory (run_id chosen beforehand, e.g. to lock it first)."""
        root = results.resolve() / (run_id or new_run_id(spec_name))
        root.mkdir(parents=True)
        return cls(root.resolve())

    @classmethod
    def open(cls, root: Path) -> RunStore:
        if not (root / "manifest.json").is_file():
            raise UsageError(f"{root}/manifest.json: not a densitylab run directory")
        return cls(root.resolve())

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest_path.read_text()))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write manifest.json; a manifest written here carries the schema version its
        tables follow (the readers accept older ones, see orchestrator.results.schema)."""
        write_json(self.manifest_path, {"schema_version": schema.SCHEMA_VERSION} | manifest)

    def trial_dir(self, trial_id: str) -> Path:
        return self.root / "trials" / trial_id

    def finished_trials(self) -> set[str]:
        if not self.manifest_path.exists():
            return set()
        return {
            t["trial_id"]
            for t in self.read_manifest().get("trials", [])
            if t.get("status") in FINISHED
        }

    def write_trial_tables(self, trial_id: str, tables: dict[str, pd.DataFrame]) -> None:
        """Replace one trial's parts (a re-run trial overwrites its old parts)."""
        d = self.trial_dir(trial_id)
        for name, df in tables.items():
            write_table(d / schema.table(name).file, name, df)

    def rebuild_run_tables(self) -> dict[str, str]:
        """Concatenate every trial's parts into run-level tables; returns name -> sha256."""
        checksums: dict[str, str] = {}
        for name in TABLES:
            parts = sorted((self.root / "trials").glob(f"*/{name}.parquet"))
            if not parts:
                continue
            frames = [pd.read_parquet(p) for p in parts]
            df = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
            path = self.root / schema.table(name).file
            write_table(path, name, df)
            checksums[path.name] = sha256_file(path)
        for name in ONCE_PER_RUN:
            path = self.root / f"{name}.parquet"
            if path.is_file():
                checksums[path.name] = sha256_file(path)
        return checksums
