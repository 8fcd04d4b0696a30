"""The walk table (latency.parquet) read out of core with DuckDB.

A campaign holds hundreds of millions of timed walks; pandas would need them all in
memory. Two passes over the parquet files instead, neither of which holds the walks:

1. Combinations: one row per distinct (trial, kernel, trigger, method, target,
   target_kind, pattern, rmap_one, vmas, mappings) with its walk count. A few thousand rows however
   many walks; they are normalised and labelled with their workload by the same code as
   before (labels.normalise_latency, labels.label_workloads), so a row of every latency
   table (kernel, trigger, workload, method) is a set of combinations.
2. Durations: every walk of a row with at most CAP walks; of a larger row a Bernoulli
   sample of about CAP walks, decided by a fixed hash of each walk's file row and the
   seed, so the same run directories always give the same sample and the same report.

What comes back is a small pandas frame of the walks kept, in the shape the statistics
read (latency.py), and the true walk count of every row. Up to CAP walks per row the
statistics are those of every walk; above it they are those of the sample (stated in
the tables as n_sampled beside n, and in the report's warnings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from orchestrator.errors import UsageError
from orchestrator.results.analysis.common import UNATTRIBUTED
from orchestrator.results.analysis.labels import label_workloads, normalise_latency
from orchestrator.results.analysis.load import Part, Run
from orchestrator.results.analysis.stats import SEED, WALK_CAP

log = logging.getLogger(__name__)

__all__ = ["CAP", "Walks", "read_walks", "walk_combos"]

CAP = WALK_CAP  # walks kept per latency row for quantiles, bootstrap and rank tests
KEYS = ("kernel", "trigger", "workload", "method")
STRINGS = (
    "trial_id", "kernel", "trigger", "method", "target", "target_kind", "pattern", "rmap_one"
)  # fmt: skip
COUNTS = ("vmas", "mappings")
# DuckDB's working memory: its aggregates here are small (a few thousand groups), and the
# report's peak RSS is the figure that matters on a 2 GiB budget.
MEMORY_LIMIT = "512MB"
ALL = np.uint64(np.iinfo(np.uint64).max)


@dataclass(frozen=True)
class Walks:
    """The walks kept, labelled: trial_id, kernel, trigger, method, workload, target_kind
    (categoricals), lower_bound, vmas (Int64, the target's own VMAs), duration_ns; with the
    workloads (label_workloads) and the true walk count of every row (KEYS tuple -> n)."""

    lat: pd.DataFrame
    workloads: pd.DataFrame
    counts: dict[tuple[str, ...], int]
    n: int
    n_unattributed: int
    cap: int

    @property
    def sampled(self) -> list[tuple[str, ...]]:
        """The rows whose statistics come from a sample (more than cap walks)."""
        return [k for k, n in self.counts.items() if n > self.cap]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _select(part: Part, index: int) -> str:
    """One part's walks with every key column (NULL where the file has none)."""
    cols = [f"{index} AS part"]
    for c in STRINGS:
        e = f'"{c}"::VARCHAR' if c in part.columns else "NULL::VARCHAR"
        if c == "trial_id" and part.prefix:
            e = f"{_quote(part.prefix)} || {e}"
        cols.append(f"{e} AS {c}")
    cols += [
        f'"{c}"::BIGINT AS {c}' if c in part.columns else f"NULL::BIGINT AS {c}" for c in COUNTS
    ]
    lb = (
        '"lower_bound"::BOOLEAN'
        if "lower_bound" in part.columns
        else "\"method\" = 'tracepoint-proxy'"
    )
    cols += [f"{lb} AS lower_bound", '"duration_ns"::BIGINT AS duration_ns', "file_row_number"]
    source = f"read_parquet({_quote(str(part.path))}, file_row_number = true)"
    # A walk without a duration was not timed: it counts nowhere (neither n nor a sample).
    return f'SELECT {", ".join(cols)} FROM {source} WHERE "duration_ns" IS NOT NULL'


KEY = ", ".join((*STRINGS, *COUNTS))
COMBO = f"hash({KEY})"  # a combination's key: the hash of its key columns, NULLs included


def _union(parts: Sequence[Part]) -> str:
    return " UNION ALL ".join(_select(p, i) for i, p in enumerate(parts))


def _kept_sql(parts: Sequence[Part], most: np.uint64) -> str:
    """The walks whose row hash (file row and seed: it decides the sample) is at most
    `most`, with their combination key. The row hash is filtered before the key columns
    are hashed, so a pass that keeps 1 walk in 10 hashes the strings of 1 in 10."""
    row = f"hash(part, file_row_number, {SEED})"
    inner = f"SELECT *, {row} AS h FROM ({_union(parts)}) WHERE {row} <= {int(most)}"
    return f"SELECT part, h, duration_ns, {COMBO} AS combo FROM ({inner})"


def _connect() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(":memory:", config={"memory_limit": MEMORY_LIMIT})


def _query(con: duckdb.DuckDBPyConnection, sql: str, parts: Sequence[Part]) -> pd.DataFrame:
    try:
        return con.execute(sql).df()
    except duckdb.Error as e:
        files = ", ".join(str(p.path) for p in parts)
        raise UsageError(f"{files}: cannot read walks: {str(e).splitlines()[0]}") from e


def walk_combos(run: Run, ok: set[str]) -> pd.DataFrame | None:
    """Pass 1: the distinct key combinations of run's walks of the trials in ok, with walk
    counts (n), normalised per part (a part written before attribution keeps its legacy
    reading). None when no walk belongs to those trials.

    Raises UsageError naming the files when DuckDB cannot read them."""
    parts = [p for p in run.parts.get("latency", ()) if p.rows]
    if not parts:
        return None
    # Grouped on the key columns themselves; their hash is taken once per combination.
    sql = (
        f"SELECT part, {COMBO} AS combo, {KEY}, bool_or(lower_bound) AS lower_bound, "
        f"count(*) AS n, min(file_row_number) AS first FROM ({_union(parts)}) "
        f"GROUP BY part, {KEY} ORDER BY part, first"
    )
    log.info("walks: combinations over %d file(s), %s walks", len(parts), f"{run.rows('latency'):,}")
    with _connect() as con:
        combos = _query(con, sql, parts)
    if combos.duplicated(["part", "combo"]).any():  # a 64-bit hash collision: never seen
        raise UsageError("latency.parquet: two walk combinations share a hash; report a bug")
    combos = combos[combos["trial_id"].isin(ok)]
    if combos.empty:
        return None
    frames = []
    for i, part in enumerate(parts):  # columns the file lacks are absent, as on disk
        c = combos[combos["part"] == i]
        absent = [
            col
            for col in ("target", "target_kind", "pattern", "rmap_one", *COUNTS)
            if col not in part.columns
        ]
        frames.append(normalise_latency(c.drop(columns=absent).reset_index(drop=True)))
    out = pd.concat(frames, ignore_index=True)
    for col in ("trial_id", "kernel", "trigger", "method"):
        out[col] = _sorted_category(out[col])
    return out


def _sorted_category(s: pd.Series) -> pd.Categorical:
    """Labels as a categorical of sorted categories, whatever order the files hold them in
    (so the order of the latency rows, and of the bootstrap draws, depends on the labels
    alone; load._concat orders combined runs' categories the same way)."""
    values = [str(v) for v in s]
    return pd.Categorical(values, categories=sorted(set(values)))


def _thresholds(combos: pd.DataFrame, cap: int) -> tuple[np.ndarray, dict[tuple[str, ...], int]]:
    """Per combination, the row-hash threshold that keeps ~cap walks of its latency row
    (every walk when the row has at most cap); and every row's walk count."""
    keys = [tuple(str(x) for x in k) for k in combos[list(KEYS)].itertuples(index=False)]
    n = combos["n"].to_numpy(dtype=np.int64)
    counts: dict[tuple[str, ...], int] = {}
    for k, c in zip(keys, n, strict=True):
        counts[k] = counts.get(k, 0) + int(c)
    rate = np.array([cap / counts[k] for k in keys], dtype=float)
    limit = np.full(len(keys), ALL, dtype=np.uint64)
    part = rate < 1.0  # 2**64 itself is no uint64: clip just below
    limit[part] = (np.minimum(rate[part], 1 - 2**-52) * 2.0**64).astype(np.uint64)
    return limit, counts


def read_walks(
    run: Run, combos: pd.DataFrame, levels: dict[str, dict[int, int]] | None = None, cap: int = CAP
) -> Walks:
    """Pass 2: the durations of the walks kept (see the module docstring), labelled with
    their workload (levels shared with another run when given, as compare does).

    Raises UsageError naming the files when DuckDB cannot read them."""
    labelled, workloads = label_workloads(combos, levels)
    limit, counts = _thresholds(labelled, cap)
    parts = [p for p in run.parts.get("latency", ()) if p.rows]
    keep = pd.DataFrame(
        {
            "part": labelled["part"].to_numpy(dtype=np.int64),
            "combo": labelled["combo"].to_numpy(dtype=np.uint64),
            "cidx": np.arange(len(labelled), dtype=np.int32),
            "limit": limit,
        }
    )
    sql = (
        f"SELECT k.cidx, w.duration_ns FROM ({_kept_sql(parts, limit.max())}) w JOIN keep k "
        "ON w.part = k.part AND w.combo = k.combo WHERE w.h <= k.limit"
    )
    log.info("walks: durations (at most about %s per row) from %d file(s)", f"{cap:,}", len(parts))
    with _connect() as con:
        con.register("keep", keep)
        rows = _query(con, sql, parts)
    cidx = rows["cidx"].to_numpy(dtype=np.int64)
    lat = _frame(labelled, cidx, rows["duration_ns"].to_numpy(dtype=np.int64))
    unattributed = labelled["target_kind"].astype(str) == UNATTRIBUTED
    return Walks(
        lat=lat,
        workloads=workloads,
        counts=counts,
        n=int(labelled["n"].sum()),
        n_unattributed=int(labelled.loc[unattributed, "n"].sum()),
        cap=cap,
    )


def _take(col: pd.Series, cidx: np.ndarray) -> pd.Series | pd.Categorical | np.ndarray:
    """Column col of the combinations, one value per walk (categoricals stay codes)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return pd.Categorical.from_codes(col.cat.codes.to_numpy()[cidx], dtype=col.dtype)
    return col.take(cidx).reset_index(drop=True)


def _frame(combos: pd.DataFrame, cidx: np.ndarray, duration_ns: np.ndarray) -> pd.DataFrame:
    cols = ("trial_id", "kernel", "trigger", "method", "workload", "target_kind")
    data = {c: _take(combos[c], cidx) for c in cols}
    data["lower_bound"] = combos["lower_bound"].to_numpy(dtype=bool)[cidx]
    data["vmas"] = _take(combos["vmas"].astype("Int64"), cidx)
    data["duration_ns"] = duration_ns
    return pd.DataFrame(data)
