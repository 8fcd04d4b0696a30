"""`densitylab clean`: sweep what a killed run left behind, found by its tags and names.

Domains carry the run id in libvirt metadata, overlays live under a folder per run,
saved KSM knobs in /run/densitylab/ksm-<run>.json, samplers are host-agent processes.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator import fleet, hostagent
from orchestrator.errors import HostError


def clean(run_ids: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Remove leftovers of the given runs (or of every run); returns (removed, errors)."""
    removed: list[str] = []
    errors: list[str] = []
    for pid in hostagent.find_samplers(run_ids=run_ids):
        hostagent.kill_pid(pid)
        removed.append(f"sampler process {pid}")
    try:
        conn = fleet.connect()
    except HostError as e:
        errors.append(str(e))
    else:
        try:
            gone, failed = fleet.clean_domains(conn, run_ids)
            removed += gone
            errors += failed
        finally:
            conn.close()
    gone, failed = hostagent.clean_host_state(run_ids)
    return removed + gone, errors + failed
