"""The run store: results/<run-id>/ with manifest.json and parquet tables.

Every file is written atomically (temp file in the same folder, then rename). Each
trial writes its own parts under trials/<trial-id>/; the run-level tables are rebuilt
from the parts after every trial, so a resumed run and a fresh one look the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.errors import UsageError

TABLES = (
    "trials",
    "ksm_samples",
    "vmstat_samples",
    "process_samples",
    "guests",
    "events",
    "latency",
    "phase_deltas",
    "integrity",
    "workload_pages",  # orchestrator.pagecount: the workload's saving page by page
)
# Written once per run, not per trial (orchestrator.checks): listed with their checksums.
RUN_TABLES = ("checks", "check_figures")
FINISHED = ("successful",)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id(spec_name: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{spec_name}-{secrets.token_hex(2)}"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(repo: Path) -> str | None:
    try:
        cp = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
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
        write_json(self.manifest_path, manifest)

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
            write_parquet(d / f"{name}.parquet", df)

    def rebuild_run_tables(self) -> dict[str, str]:
        """Concatenate every trial's parts into run-level tables; returns name -> sha256."""
        checksums: dict[str, str] = {}
        for name in TABLES:
            parts = sorted((self.root / "trials").glob(f"*/{name}.parquet"))
            if not parts:
                continue
            frames = [pd.read_parquet(p) for p in parts]
            df = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
            path = self.root / f"{name}.parquet"
            write_parquet(path, df)
            checksums[path.name] = sha256_file(path)
        for name in RUN_TABLES:
            path = self.root / f"{name}.parquet"
            if path.is_file():
                checksums[path.name] = sha256_file(path)
        return checksums
