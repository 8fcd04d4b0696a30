"""The run directory's manifest.json, validated before `report`, `compare` or a resume
reads it.

A run directory is input like a spec: copied between machines, edited, truncated. The
readers (analysis, report, capacity) take the manifest's fields as they come, so the
fields they read are checked here for type and shape, and any failure is one line
naming the file and the field: `results/r/manifest.json: trials.0.status: Input should
be a valid string, got 3`. Fields nobody reads are let through: other versions of
densitylab write more than this model knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import UsageError, printable
from orchestrator.results import schema
from orchestrator.spec import MAX_SEED, check_name, format_validation_error, read_regular_file

# A manifest holds facts and one row per trial: a few hundred KiB at most.
MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def one_line(text: str) -> str:
    """Text that readers print on the terminal (warnings, versions): no control
    characters, so a manifest cannot break lines or drive the terminal."""
    if not text.isprintable():
        raise ValueError("contains a control character")
    return text


def run_id(text: str) -> str:
    """Run ids become folder names and trial-id prefixes: <time>-<spec name>-<hex>."""
    if not text or len(text) > 200 or not all(c.isalnum() or c in "_.+-" for c in text):
        raise ValueError("use letters, digits, '_', '.', '+', '-' (at most 200)")
    if not text[0].isalnum():
        raise ValueError("must start with a letter or digit")
    return text


def readable_version(version: int) -> int:
    """A schema version this densitylab reads (orchestrator.results.schema)."""
    if version not in schema.READABLE_VERSIONS:
        known = ", ".join(map(str, schema.READABLE_VERSIONS))
        raise ValueError(f"this densitylab reads schema versions {known}")
    return version


Line = Annotated[str, AfterValidator(one_line)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Model(BaseModel):
    # Unknown fields are kept (newer writers); known ones are held to their types.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class Trial(Model):
    trial_id: Line
    status: Line
    kernel: Line | None = None
    fleet_size: Annotated[int, Field(ge=0)] | None = None
    repeat: Annotated[int, Field(ge=0)] | None = None
    reason: str | None = None  # free text; the report escapes it


class Kernel(Model):
    name: Annotated[str, AfterValidator(check_name)]
    release: Line | None = None
    origin: Line | None = None
    config_sha256: Line | None = None


class Memory(Model):
    value: Positive | None = None


class HostFacts(Model):
    """The doctor's facts; the readers use the page size, RAM and a few labels."""

    page_size_bytes: Annotated[int, Field(gt=0, le=1 << 30)] | None = None
    page_size: Annotated[int, Field(gt=0, le=1 << 30)] | None = None
    memory: Memory | None = None
    # capacity.HOST_RAM_KEYS: facts that may carry the host's RAM
    mem_total_kib: Positive | None = None
    memtotal_kib: Positive | None = None
    mem_total_mib: Positive | None = None
    mem_total_bytes: Positive | None = None
    mem_total_gib: Positive | None = None
    ram_gib: Positive | None = None
    kernel_release: Line | dict[str, Any] | None = None
    accel: Line | dict[str, Any] | None = None


class Manifest(Model):
    run_id: Annotated[str, AfterValidator(run_id)]
    # Absent: written before the schema had a version (schema.LEGACY_VERSION).
    schema_version: Annotated[int, AfterValidator(readable_version)] | None = None
    spec_name: Annotated[str, AfterValidator(check_name)]
    trials: list[Trial]
    spec_sha256: Line | None = None
    spec: dict[str, Any] | None = None
    densitylab_version: Line | None = None
    git_commit: Line | None = None
    host: HostFacts | None = None
    kernel_release: Line | None = None
    qemu_version: Line | None = None
    libvirt_version: Line | None = None
    accel: Line | None = None
    kernels: list[Kernel] | None = None
    warnings: list[Line] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED + 1)] | None = None
    started_at: Line | None = None
    ended_at: Line | None = None
    files: dict[str, Line] | None = None
    # Made in memory when runs are combined (results.analysis.combine_runs), never on disk.
    combined_from: None = None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping once past limit."""
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, d + 1) for c in children)
    return deepest


def parse_manifest(data: bytes, source: str) -> dict[str, Any]:
    """The manifest in data, validated; returned as the mapping it is on disk.

    Raises UsageError, one line naming source and the field."""
    try:
        raw = json.loads(data, parse_constant=_no_constant)  # NaN, Infinity
    except RecursionError as e:
        raise UsageError(f"{source}: cannot read manifest: nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(printable(f"{source}: cannot read manifest: {str(e)[:200]}")) from e
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if _depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise UsageError(f"{source}: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        Manifest.model_validate(raw)
    except ValidationError as e:
        raise UsageError(format_validation_error(source, e)) from e
    return raw


def load_manifest(run_dir: Path) -> dict[str, Any]:
    """run_dir/manifest.json, read as a small regular file and validated (see
    parse_manifest). Raises UsageError naming the file."""
    path = run_dir / "manifest.json"
    name = printable(str(path))
    if not run_dir.is_dir():
        raise UsageError(f"{printable(str(run_dir))}: no such run directory")
    if not path.exists():
        raise UsageError(f"{name}: missing; {printable(str(run_dir))} is not a run directory")
    return parse_manifest(read_regular_file(path, MAX_MANIFEST_BYTES), name)
