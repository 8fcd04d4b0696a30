"""The run directory's schema: every table's name, file, columns, dtypes and units.

This module is the one place the contract is written down. The writers (the run store,
which checks and normalises every table it writes against it), the readers (the analysis)
and the tests' synthetic runs all import it. Units are in the column names (`t_s`,
`ts_ns`, `memory_mib`, `general_profit_bytes`); page counts (`pages_*`) are in pages of
the host's page size (manifest host.page_size_bytes).

Versions (manifest `schema_version`):
  1  every run written before the schema had a version (the field is absent): the same
     tables, read as they come.
  2  the manifest carries schema_version; tables are checked at write time (required
     columns present, typed nulls instead of untyped ones).
Readers accept every version in READABLE_VERSIONS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from orchestrator.errors import DensitylabError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
LEGACY_VERSION = 1  # a manifest without schema_version

Dtype = Literal["str", "int", "float", "bool"]
# Each logical dtype as pandas writes it when a column holds only nulls (so that the
# parquet type does not depend on whether a trial happened to record a value).
PANDAS_NULL_DTYPES: dict[str, str] = {
    "str": "string",
    "int": "Int64",
    "float": "float64",
    "bool": "boolean",
}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: Dtype
    required: bool = False


@dataclass(frozen=True)
class Table:
    """One parquet table of a run directory. `sample` tables grow with the run's length
    (one row per sample or walk) and are read out of core; the others are small."""

    name: str
    columns: tuple[Column, ...]
    sample: bool = False

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)

    def dtype(self, column: str) -> Dtype | None:
        return next((c.dtype for c in self.columns if c.name == column), None)


def _cols(spec: str, dtype: Dtype, required: bool = False) -> tuple[Column, ...]:
    return tuple(Column(n, dtype, required) for n in spec.split())


def _join(*parts: tuple[Column, ...] | Column) -> tuple[Column, ...]:
    return tuple(c for p in parts for c in (p if isinstance(p, tuple) else (p,)))


# Every sample table starts with these: the trial, the phase the sample fell in, the
# host's CLOCK_MONOTONIC (ns) and seconds since the trial started.
_SAMPLE_KEYS = (
    Column("trial_id", "str", True),
    Column("phase", "str", True),
    Column("ts_ns", "int"),
    Column("t_s", "float"),
)

TRIALS = Table(
    "trials",
    _join(
        _cols("trial_id kernel", "str", True),
        _cols("fleet_size", "int", True),
        _cols("status", "str", True),
        _cols("kernel_release accel reason latency_method latency_notes host saving_method", "str"),
        _cols("ksm_setting", "str"),
        _cols("repeat guest_memory_mib workload_mib walks started_ns ended_ns", "int"),
        _cols("pages_sharing pages_shared", "int"),
        _cols("settled baseline_settled attributed", "bool"),
        _cols(
            "settle_s baseline_saving_mib predicted_saving_mib total_saving_mib "
            "residual_saving_mib pre_scramble_saving_mib measured_saving_mib pagecount_saving_mib "
            "general_profit_mib ksmd_cpu_s mappings_per_ksm_page",
            "float",
        ),
    ),
)
KSM_SAMPLES = Table(
    "ksm_samples",
    _join(
        _SAMPLE_KEYS[:2],
        (Column("ts_ns", "int"), Column("t_s", "float", True)),
        _cols("pages_sharing", "int", True),
        _cols(
            "full_scans pages_scanned pages_shared pages_unshared pages_volatile pages_skipped "
            "ksm_zero_pages stable_node_chains stable_node_dups general_profit_bytes "
            "mem_free_kib mem_available_kib",
            "int",
        ),
        _cols("ksmd_cpu_s", "float"),
    ),
    sample=True,
)
VMSTAT_SAMPLES = Table(
    "vmstat_samples",
    _join(
        _SAMPLE_KEYS[:2],
        (Column("ts_ns", "int", True), Column("t_s", "float")),
        _cols("counter", "str", True),
        _cols("value", "int", True),
    ),
    sample=True,
)
PROCESS_SAMPLES = Table(
    "process_samples",
    _join(
        (Column("trial_id", "str", True), Column("phase", "str"), *_SAMPLE_KEYS[2:]),
        _cols("guest", "str", True),
        _cols(
            "pid ksm_rmap_items ksm_zero_pages ksm_merging_pages ksm_process_profit_bytes ram_vmas",
            "int",
        ),
    ),
    sample=True,
)
GUESTS = Table(
    "guests",
    _join(
        _cols("trial_id guest", "str", True),
        _cols("workload_kind", "str"),
        _cols("pid boot_retries dup_pages zero_pages unique_pages volatile_pages vmas", "int"),
        _cols("boot_s ready_s fill_s", "float"),
    ),
)
EVENTS = Table(
    "events",
    _join(
        (Column("trial_id", "str", True), Column("ts_ns", "int"), Column("t_s", "float")),
        _cols("phase", "str"),
        _cols("event", "str", True),
        _cols("detail", "str"),
    ),
)
# One row per timed rmap_walk_ksm; target..mappings: the workload whose page was walked
# (orchestrator.attribution; absent in runs written before attribution); rmap_one: which
# walk (the rmap_walk_control's function, e.g. try_to_migrate_one; absent before 2026-12).
LATENCY = Table(
    "latency",
    _join(
        _cols("trial_id kernel trigger method", "str", True),
        _cols("duration_ns", "int", True),
        _cols("lower_bound", "bool"),
        (Column("ts_ns", "int"), Column("t_s", "float")),
        _cols("caller rmap_one comm target target_kind pattern", "str"),
        _cols("pid vmas mappings", "int"),
    ),
    sample=True,
)
PHASE_DELTAS = Table(
    "phase_deltas",
    _join(_cols("trial_id phase counter", "str", True) + _cols("delta", "int", True)),
)
INTEGRITY = Table(
    "integrity",
    _join(
        _cols("trial_id phase", "str", True),
        _cols("step", "int"),
        _cols("workload", "str", True),
        _cols("pages_checked mismatches", "int", True),
        _cols("first_mismatch_pages", "str"),
        _cols("verify_s", "float"),
        (Column("ts_ns", "int"), Column("t_s", "float")),
    ),
)
# orchestrator.pagecount: the workload's saving counted page by page, per guest.
WORKLOAD_PAGES = Table(
    "workload_pages",
    _join(
        _cols("trial_id guest", "str", True),
        _cols("method", "str"),
        _cols("pages guest_present host_present ksm_pages zero_pages saving_pages", "int"),
        _cols("saving_mib", "float"),
    ),
)
# The KSM knobs each trial applied (a swept knob varies between trials; trials.ksm_setting
# names the swept values): as requested, and as the host reported them in force.
KSM_SETTINGS = Table(
    "ksm_settings",
    _join(
        _cols("trial_id knob", "str", True),
        _cols("requested in_force", "str"),
        _cols("swept", "bool"),
    ),
)
# A playbook workload (workload.kind playbook): each guest's outcome of each play.
# play: workload (after boot) or load (during the hold); tasks_s: its tasks' durations.
PLAYS = Table(
    "plays",
    _join(
        _cols("trial_id guest play status", "str", True),
        _cols("playbook message", "str"),
        _cols("ok changed failures skipped", "int"),
        _cols("tasks_s", "float"),
    ),
)
# `densitylab check` runs: written at the run's root, not rebuilt from trial parts.
CHECKS = Table(
    "checks",
    _join(
        _cols("kernel check status", "str", True),
        _cols("kernel_release reason", "str"),
        _cols("duration_s", "float"),
    ),
)
CHECK_FIGURES = Table(
    "check_figures",
    _join(_cols("kernel check figure", "str", True) + _cols("value", "float", True)),
)

# Tables of an experiment run, rebuilt from the trials' parts (the store's order).
RUN_TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        TRIALS,
        KSM_SAMPLES,
        VMSTAT_SAMPLES,
        PROCESS_SAMPLES,
        GUESTS,
        EVENTS,
        LATENCY,
        PHASE_DELTAS,
        INTEGRITY,
        WORKLOAD_PAGES,
        KSM_SETTINGS,
        PLAYS,
    )
}
CHECK_TABLES: dict[str, Table] = {t.name: t for t in (CHECKS, CHECK_FIGURES)}
TABLES: dict[str, Table] = RUN_TABLES | CHECK_TABLES
# The analysis reads these; integrity.parquet is read by orchestrator.integrity, and
# workload_pages.parquet is the per-guest detail of trials.pagecount_saving_mib,
# ksm_settings.parquet that of trials.ksm_setting, plays.parquet the per-guest record of a
# playbook workload.
ANALYSIS_TABLES = tuple(
    n for n in RUN_TABLES if n not in ("integrity", "workload_pages", "ksm_settings", "plays")
)


def table(name: str) -> Table:
    """The table called name. Raises KeyError naming it when the schema has none."""
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"no table {name!r} in the run-directory schema") from None


def manifest_version(manifest: dict[str, object]) -> int:
    """The schema version a manifest was written under (absent: LEGACY_VERSION)."""
    v = manifest.get("schema_version", LEGACY_VERSION)
    return v if isinstance(v, int) else -1


class SchemaError(DensitylabError):
    """A writer produced a table the schema does not allow (a bug in the writer)."""

    def __init__(self, table: str, reason: str):
        super().__init__(f"{table}.parquet: {reason}")
        self.table, self.reason = table, reason
