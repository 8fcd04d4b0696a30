"""`densitylab clean`: sweep what a killed run left behind, never what a live run uses.

What a run leaves is found by its run id: domains carry it in libvirt metadata, overlays
live under a folder per run, saved KSM knobs, swap and offline memory blocks in
/run/densitylab/<kind>-<run>.json, cgroups are densitylab-<run>, trace probes are
tagged with it, samplers write into the run's directory. A run whose owner is alive
(see runlock) is skipped and said so, unless forced; run ids match exactly.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator import fleet, runlock
from orchestrator.agent import leftovers, procs
from orchestrator.errors import HostError, UsageError

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,159}")


@dataclass
class CleanReport:
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per live run left alone
    errors: list[str] = field(default_factory=list)

    def add(self, result: tuple[list[str], list[str]]) -> None:
        self.removed += result[0]
        self.errors += result[1]


def check_selector(run_ids: Sequence[str]) -> None:
    """Refuse selectors that are empty or could reach outside a run's own names: an
    empty string used to match every run (`clean ""` stopped every sampler)."""
    if not run_ids:
        raise UsageError("clean: empty run selector (give run ids, or none to sweep gone runs)")
    for r in run_ids:
        if not RUN_ID_RE.fullmatch(r) or ".." in r:
            raise UsageError(
                f"clean: run id {r[:80]!r}: not a run id (letters, digits, '_', '.', '-')"
            )


def discover(conn: Any) -> set[str]:
    """Run ids that own anything on this host now (lock, domain, overlay, state, cgroup,
    sampler). Collector trace tags map to run ids only through these (see orphan_tags)."""
    found = set(runlock.survey())
    if conn is not None:
        found |= {run_id for _, run_id in fleet.tagged_domains(conn) if run_id}
    if fleet.OVERLAY_ROOT.exists():
        found |= {d.name for d in fleet.OVERLAY_ROOT.iterdir()}
    for kind in ("ksm", "swap", "offline"):
        found |= set(leftovers.state_files(kind))
    found |= set(leftovers.our_cgroups())
    found |= {h.run_id for h in procs.agent_helpers() if h.run_id}
    return found


def sweep_run(run_id: str, conn: Any, report: CleanReport) -> None:
    """Remove everything of one run, going on past errors. The caller holds its lock."""
    for h in procs.agent_helpers():
        if h.serves(run_id):
            procs.kill_pid(h.pid)
            report.removed.append(f"sampler process {h.pid} (run {run_id})")
    if conn is not None:
        report.add(fleet.clean_domains(conn, [run_id]))
    # The host's KSM knobs are saved by a starting run under the same mutex; a restore
    # must not interleave with that save.
    with runlock.host_mutex():
        report.add(leftovers.clean_run_state(run_id))


def sweep_owned(run_id: str) -> CleanReport:
    """What `run --resume` does first: remove what the killed process of run_id left.
    The caller holds run_id's lock already."""
    report = CleanReport()
    conn = connect(report)
    try:
        sweep_run(run_id, conn, report)
    finally:
        if conn is not None:
            conn.close()
    return report


def connect(report: CleanReport) -> Any:
    try:
        return fleet.connect()
    except HostError as e:
        report.errors.append(str(e))
        return None


def clean(run_ids: Sequence[str] | None = None, force: bool = False) -> CleanReport:
    """Remove leftovers of the given runs (exact ids) or of every run whose owner is gone.

    Live runs are skipped (one line each in report.skipped) unless force. Raises
    UsageError for an empty or malformed selector, before anything is touched.
    """
    if run_ids is not None:
        check_selector(run_ids)
    report = CleanReport()
    conn = connect(report)
    try:
        targets = discover(conn) if run_ids is None else set(run_ids)
        # Newest first: where several runs saved KSM knobs (older versions saved a killed
        # run's knobs as the host's), the oldest save is restored last and stays.
        live = [r for r in sorted(targets, reverse=True) if not clean_one(r, conn, force, report)]
        if run_ids is None:
            sweep_orphans(conn, force or not live, report)
    finally:
        if conn is not None:
            conn.close()
    return report


def clean_one(run_id: str, conn: Any, force: bool, report: CleanReport) -> bool:
    """Sweep one run under its lock; False when it is live and was left alone."""
    if not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        # Not a name any run of ours locks (a stray overlay folder): nothing can own it.
        sweep_run(run_id, conn, report)
        return True
    claim = runlock.claim_gone(run_id)
    if claim is None and not force:
        state = runlock.inspect(runlock.lock_path(run_id))
        report.skipped.append(f"{state.describe()}: live, left alone (--force cleans it)")
        return False
    with claim or contextlib.nullcontext():
        sweep_run(run_id, conn, report)
    return True


def orphan_tags(known: Iterable[str]) -> set[str]:
    """Trace tags that belong to no run id known here (their run left nothing else)."""
    mine = {r.replace("-", "_") for r in known}
    return leftovers.trace_tags() - mine


def sweep_orphans(conn: Any, no_live_run: bool, report: CleanReport) -> None:
    """What no run id names: trace probes of unknown runs, samplers outside any run
    directory whose parent is gone, and our tracefs mount once no run is live."""
    tags = orphan_tags(discover(conn))
    if tags:
        report.add(leftovers.clean_tracing(run_ids=[], tags=tags))
    for h in procs.agent_helpers():
        orphaned = h.parent_pid is None or not procs.pid_alive(h.parent_pid)
        if h.run_id is None and h.tag is None and orphaned:
            procs.kill_pid(h.pid)
            report.removed.append(f"sampler process {h.pid}")
    if no_live_run:
        report.add(leftovers.unmount_our_tracefs())
