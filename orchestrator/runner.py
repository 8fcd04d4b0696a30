"""A run: spec -> trials, each run by the trial engine on its host -> run store.

The run's lock is held from before the host is touched to after the last trial; the
manifest records versions, kernels, images and every trial's outcome.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from orchestrator import (
    __version__,
    abdiff,
    checks,
    fleet,
    guestimage,
    images,
    plan,
    runlock,
    store,
)
from orchestrator.agent import fs, leftovers, sample
from orchestrator.engine.context import RunContext
from orchestrator.engine.state import Progress, QuietProgress, TrialResult
from orchestrator.engine.trial import run_trial
from orchestrator.errors import DensitylabError, HostBusy, HostError, UsageError
from orchestrator.hosts.base import Host
from orchestrator.hosts.labvm import LabVmHost
from orchestrator.hosts.local import LocalHost, ksm_saved_path
from orchestrator.interrupts import InterruptGuard
from orchestrator.kernelspec import label_of, labels
from orchestrator.manifest import load_manifest
from orchestrator.spec import Spec, check_fits_host, load_spec

if TYPE_CHECKING:
    from orchestrator.hosts.inventory import InventoryHost

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def adopt_saved_ksm(run_id: str) -> list[str]:
    """Make the host's original KSM knobs, saved by runs whose owner is gone, this run's.

    A killed run leaves its knobs in force and the host's own values in its saved file;
    reading the knobs now would save the killed run's values as the host's (what a
    resume after SIGKILL did once: the host's values were lost). So the originals are
    moved over, never re-read: the oldest save wins per knob, and apply_ksm only adds
    knobs no save has. Returns the run ids adopted from. Call with the run lock held.
    """
    mine = ksm_saved_path(run_id)
    with runlock.host_mutex():
        gone = [
            p
            for r, p in leftovers.state_files("ksm", fs.STATE_DIR).items()
            if r != run_id and not runlock.inspect(runlock.lock_path(r)).live
        ]
        if not gone:
            return []
        files = sorted([*gone, *([mine] if mine.exists() else [])], key=lambda p: p.stat().st_mtime)
        saves = [json.loads(p.read_text()) for p in files]
        knobs: dict[str, str] = {}
        for data in reversed(saves):  # older saves overwrite newer ones
            knobs.update(data["knobs"])
        fs.write_json_atomic(mine, {"ksm_dir": saves[0]["ksm_dir"], "knobs": knobs})
        for p in gone:
            p.unlink()
    adopted = [p.stem.removeprefix("ksm-") for p in gone]
    log.warning("KSM: adopted the host's saved knobs from run(s) %s", ", ".join(adopted))
    return adopted


# ---------------------------------------------------------------- experiments


def host_available_mib() -> int:
    return sample.read_meminfo_kib().get("MemAvailable", 0) // 1024


def pick_domain_type(requested: str, facts: dict[str, Any]) -> str:
    """libvirt domain type for the spec's accel: auto picks KVM only where it boots guests."""
    probed = facts["accel"]["value"]
    if requested == "auto":
        return "kvm" if probed == "kvm" else "qemu"
    if requested == "kvm" and probed != "kvm":
        raise UsageError(f"fleet.accel: kvm requested but {facts['accel']['how']}")
    return "kvm" if requested == "kvm" else "qemu"


def new_manifest(
    spec_path: Path,
    raw: dict[str, Any],
    spec_sha: str,
    spec: Spec,
    facts: dict[str, Any],
    image: images.TinyImage,
    run_id: str,
    domain_type: str,
) -> dict[str, Any]:
    libvirt_facts = facts.get("libvirt", {})
    return {
        "run_id": run_id,
        "spec_name": spec.name,
        "spec_path": str(spec_path),
        "spec": raw,
        "spec_sha256": spec_sha,
        "densitylab_version": __version__,
        "git_commit": store.git_commit(REPO),
        "host": facts,
        "kernel_release": os.uname().release,
        "qemu_version": libvirt_facts.get("qemu"),
        "libvirt_version": libvirt_facts.get("libvirt"),
        "accel": "kvm" if domain_type == "kvm" else "tcg",
        "accel_how": facts["accel"]["how"],
        "images": {"tiny": describe_image(image), **lab_image_record(spec)},
        "guest_image": guestimage.record(guestimage.resolve(spec, str(spec_path))),
        **dict(zip(("kernels", "warnings"), kernel_records(spec), strict=True)),
        "seed": spec.seed,
        "workload_seed": spec.workload_seed,
        "host_workload_seed": spec.host_workload_seed,
        "started_at": store.utc_now(),
        "ended_at": None,
        "trials": [],
        "files": {},
    }


def kernel_records(spec: Spec) -> tuple[list[dict[str, Any]], list[str]]:
    """The kernels under test (release, origin, config hash) and A/B hygiene warnings:
    two kernels that differ by more than the change under study."""
    if spec.host.kind == "local":
        return [
            {"name": k, "release": os.uname().release, "origin": "running", "config_sha256": None}
            for k in labels(spec.kernels)
        ], []
    if spec.host.kind == "inventory":  # resolved on each machine: see manifest.machines
        return [
            {"name": k, "release": None, "origin": "installed", "config_sha256": None}
            for k in labels(spec.kernels)
        ], []

    from orchestrator import kbuild, labimage

    built = {
        k["label"]: k for k in json.loads(labimage.find_lab_image().manifest.read_text())["kernels"]
    }
    recs = []
    for entry in spec.kernels:
        local = kbuild.bootable(entry)
        if local is not None:  # origin, tree hash, patch sha256s, config sha256
            recs.append(dict(local.record))
        elif (k := built.get(label_of(entry))) is not None:
            recs.append(
                {
                    "name": k["label"],
                    "release": k["release"],
                    "origin": k["origin"],
                    "config_sha256": k.get("config_sha256"),
                }
            )
    warnings = []
    for a, b in itertools.pairwise(recs):
        diffs = []
        if a["release"].split("+")[0] != b["release"].split("+")[0]:
            diffs.append(f"versions {a['release']} vs {b['release']}")
        if a["config_sha256"] != b["config_sha256"]:
            diffs.append("configs differ")
        if a.get("tree_sha256") and b.get("tree_sha256"):
            b["differs_from"] = abdiff.source_pair_diff(a, b)
            if a["tree_sha256"] != b["tree_sha256"]:
                diffs.append("source trees differ")
        if diffs:
            warnings.append(
                f"kernels {a['name']} and {b['name']} differ by more than the "
                f"change under study ({'; '.join(diffs)}): other changes between "
                "them can move these numbers too"
            )
    return recs, warnings


def lab_image_record(spec: Spec) -> dict[str, Any]:
    """The lab image's manifest (kernels with release, origin and config hash)."""
    if spec.host.kind != "labvm":
        return {}

    from orchestrator import labimage

    lab = labimage.find_lab_image()
    return {
        "labhost": {
            "key": lab.key,
            "rootfs": str(lab.rootfs),
            "build_manifest": json.loads(lab.manifest.read_text()),
        }
    }


def describe_image(image: images.TinyImage) -> dict[str, Any]:
    """The image's build manifest plus the checksums of what the guests boot."""

    return {
        "key": image.key,
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "kernel_sha256": store.sha256_file(image.kernel),
        "initrd_sha256": store.sha256_file(image.initrd),
        "build_manifest": json.loads(image.manifest.read_text()),
    }


def record_trial(manifest: dict[str, Any], res: TrialResult) -> None:
    manifest["trials"] = [t for t in manifest["trials"] if t["trial_id"] != res.trial_id]
    manifest["trials"].append(
        {
            "trial_id": res.trial_id,
            "kernel": res.kernel,
            "fleet_size": res.fleet_size,
            "repeat": res.repeat,
            "status": res.status,
            "reason": res.reason,
            # what `plan` estimates the next run of this spec from
            "wall_s": round(max(0, res.ended_ns - res.started_ns) / 1e9, 1),
        }
    )


@dataclass
class RunOutcome:
    store: store.RunStore
    results: list[TrialResult]
    skipped: list[str]

    @property
    def ok(self) -> bool:
        return all(r.status == "successful" for r in self.results)


Prepared = tuple[images.TinyImage, dict[str, Any], str]


def prepare(spec: Spec, spec_path: Path) -> Prepared:
    """Validate everything that can be checked before the host is touched (the run lock
    is held already, so another run's guests cannot make this host look full)."""
    from orchestrator import doctor  # imports libvirt; kept out of `plan`'s path

    check_fits_host(spec, host_available_mib(), str(spec_path))
    guestimage.resolve(spec, str(spec_path))  # HostError: the image is not built
    image = images.find_tiny_image()
    if spec.host.kind == "labvm":
        from orchestrator import labimage

        lab = labimage.find_lab_image()
        for k in spec.kernels:
            # UsageError naming the kernel the image lacks; HostError for one not built
            labimage.resolve_kernel(lab, k)
    if spec.host.kind == "inventory":
        from orchestrator.hosts.inventory import check_kernels

        check_kernels(spec)
    report = doctor.run_doctor(check_bpf=False)
    if not report.ok:
        raise HostError("host not ready: " + "; ".join(report.problems))
    return image, report.facts, pick_domain_type(spec.fleet.accel, report.facts)


def open_resumed(resume: Path, spec_path: Path, sha: str) -> store.RunStore:
    """The run directory to resume; reads only. UsageError when it is none, or when its
    spec differs."""
    # The resumed run is input too: its manifest is validated (one line on a broken one)
    # before the lock, the sweep or the doctor touch the host.
    if load_manifest(resume).get("spec_sha256") != sha:
        raise UsageError(
            f"{spec_path}: differs from the spec of run {resume} "
            "(a resumed run must use the same spec)"
        )
    return store.RunStore.open(resume)


def sweep_killed_run(st: store.RunStore, done: set[str]) -> None:
    """Before a resume reruns anything: remove what the killed process left on the host
    (its domains, samplers, probes, swap, cgroups, overlays: `clean` for this run id),
    and set aside the folders of trials it did not finish, so their console logs,
    samples and artifacts do not mix with the rerun's. Raises HostError when something
    could not be removed (a rerun would trip over it)."""
    from orchestrator import cleanup

    report = cleanup.sweep_owned(st.run_id)
    for r in report.removed:
        log.warning("resume %s: removed %s", st.run_id, r)
    if report.errors:
        raise HostError(
            f"resume {st.run_id}: cannot remove what the killed run left: "
            + "; ".join(report.errors)
        )
    # A kill in the middle of an atomic write leaves its temp file (.<name>.<random>);
    # the file it was to replace is intact.
    for tmp in [*st.root.glob(".*.json.*"), *st.root.glob(".*.parquet.*")]:
        tmp.unlink(missing_ok=True)
    trials = st.root / "trials"
    for d in sorted(trials.iterdir()) if trials.is_dir() else []:
        if d.is_dir() and d.name not in done:
            n = 1
            while (st.root / "unfinished" / f"{d.name}.{n}").exists():
                n += 1
            (st.root / "unfinished").mkdir(exist_ok=True)
            d.rename(st.root / "unfinished" / f"{d.name}.{n}")
            log.warning("resume %s: set aside unfinished trial folder %s", st.run_id, d.name)


def run_experiment(
    spec_path: Path,
    results_dir: Path = Path("results"),
    resume: Path | None = None,
    progress: Progress | None = None,
) -> RunOutcome:
    """Run every trial of a spec (skipping finished ones when resuming).

    The run's lock is taken before the host is touched: HostBusy (exit 2) when another
    run is live here, or the resumed run is."""
    spec, raw, sha = load_spec(spec_path)
    guestimage.check_files(spec, str(spec_path))  # a wrong path: one line, nothing touched
    resumed = open_resumed(resume, spec_path, sha) if resume is not None else None
    run_id = resumed.run_id if resumed is not None else store.new_run_id(spec.name)
    role = "remote" if spec.host.kind == "inventory" else "run"
    with runlock.acquire_run(run_id, spec.name, role=role):
        if role == "run":  # this host's KSM is the run's
            adopt_saved_ksm(run_id)
        if resumed is not None:
            sweep_killed_run(resumed, resumed.finished_trials())
        image, facts, domain_type = prepare(spec, spec_path)
        st = resumed or store.RunStore.create(results_dir, spec.name, run_id)
        manifest = (
            st.read_manifest()
            if resumed is not None
            else new_manifest(spec_path, raw, sha, spec, facts, image, st.run_id, domain_type)
        )
        try:
            return run_trials(spec, spec_path, st, manifest, image, facts, domain_type, progress)
        except HostBusy:
            if resumed is None:  # refused before any trial: leave nothing behind
                shutil.rmtree(st.root, ignore_errors=True)
            raise


def host_for(ctx: RunContext) -> Host:
    """The backend the spec's host.kind names."""
    spec, run_id = ctx.spec, ctx.store.run_id
    if spec.host.kind == "labvm":
        return LabVmHost(spec, run_id, ctx.conn, ctx.domain_type)
    return LocalHost(run_id, ctx.facts, ctx.domain_type, spec.sampling.interval_s)


def run_trials(
    spec: Spec,
    spec_path: Path,
    st: store.RunStore,
    manifest: dict[str, Any],
    image: images.TinyImage,
    facts: dict[str, Any],
    domain_type: str,
    progress: Progress | None,
) -> RunOutcome:
    manifest["ended_at"] = None
    st.write_manifest(manifest)
    done = st.finished_trials()
    guard = InterruptGuard()
    conn = fleet.connect()
    ctx = RunContext(
        spec, spec_path, st, image, conn, domain_type, facts, guard, progress or QuietProgress(),
        guestimage.resolve(spec, str(spec_path)),
    )  # fmt: skip
    outcome = RunOutcome(st, [], [])
    lock = threading.Lock()  # trials on several machines finish in parallel

    def on_result(res: TrialResult) -> None:
        with lock:
            outcome.results.append(res)
            record_trial(manifest, res)
            finish_run(st, manifest)

    pending = []
    for trial in plan.expand(spec):
        if trial.trial_id in done:
            outcome.skipped.append(trial.trial_id)
        else:
            pending.append(trial)
    try:
        with guard.installed():
            if spec.host.kind == "inventory":
                run_on_inventory(ctx, pending, on_result, manifest, outcome, lock)
            else:
                run_on_one_host(ctx, host_for(ctx), pending, on_result, manifest)
            checks.run_within(spec, st, manifest, guard)  # the spec's checks:, per kernel
    finally:
        finish_run(st, manifest)
        conn.close()
    return outcome


def run_on_one_host(
    ctx: RunContext,
    host: Host,
    trials: list[plan.Trial],
    on_result: Callable[[TrialResult], None],
    manifest: dict[str, Any],
) -> None:
    """Every trial in plan order on one host, which keeps what it may reuse (a lab VM
    per kernel) until the run ends, also on error or Ctrl-C."""
    try:
        for trial in trials:
            run_trial(ctx, host, trial, on_result)
    finally:
        with ctx.guard.deferred():
            for note in host.close():
                manifest.setdefault("events", []).append(
                    {"at": store.utc_now(), "event": "host-closed", "detail": note}
                )


class LockedProgress:
    """A front end told from several threads, one call at a time."""

    def __init__(self, inner: Progress):
        self.inner, self.lock = inner, threading.Lock()

    def phase(self, trial_id: str, phase: str) -> None:
        with self.lock:
            self.inner.phase(trial_id, phase)

    def guest_event(self, guest: str, event: str) -> None:
        with self.lock:
            self.inner.guest_event(guest, event)

    def merge(self, sharing_mib: float, target_mib: float | None, full_scans: int) -> None:
        with self.lock:
            self.inner.merge(sharing_mib, target_mib, full_scans)


def run_on_inventory(
    ctx: RunContext,
    trials: list[plan.Trial],
    on_result: Callable[[TrialResult], None],
    manifest: dict[str, Any],
    outcome: RunOutcome,
    lock: threading.Lock,
) -> None:
    """The trials spread over the inventory's machines (engine.pool); the manifest
    records every machine's facts and the run's events (a machine drained, a trial
    rerun elsewhere, kernels switched back)."""
    from orchestrator import inventory
    from orchestrator.engine.pool import run_on_machines
    from orchestrator.hosts.inventory import InventoryHost

    spec, st = ctx.spec, ctx.store
    assert spec.host.inventory is not None
    machines = inventory.load_inventory(Path(spec.host.inventory), spec.host.pattern)
    known_hosts = st.root / "ssh" / "known_hosts"
    hosts = [InventoryHost(m, spec, st.run_id, known_hosts) for m in machines]
    ctx.progress = LockedProgress(ctx.progress)

    def event(name: str, detail: str) -> None:
        log.warning("%s: %s", name, detail)
        with lock:
            manifest.setdefault("events", []).append(
                {"at": store.utc_now(), "event": name, "detail": detail}
            )

    claim_machines(hosts, event)

    def run_one(host: InventoryHost, trial: plan.Trial) -> TrialResult:
        res = run_trial(ctx, host, trial, on_result)
        try:
            record = host.record()
        except DensitylabError as e:  # gone: the pool finds out and drains it
            record = {"unreachable": str(e)}
        with lock:
            manifest.setdefault("machines", {}).setdefault(host.machine.name, {}).update(record)
        return res

    def drained(trial: plan.Trial, res: TrialResult) -> None:
        """Rerun elsewhere: this attempt's folder is kept aside, its row dropped."""
        with lock:
            outcome.results.remove(res)
            set_aside(st, trial.trial_id)

    left = run_on_machines(hosts, trials, run_one, drained, event, ctx.guard)
    for trial in left:
        fail_unrun(ctx, trial, "no machine of the inventory was left to run it", on_result)
    hygiene = machine_hygiene(manifest.get("machines", {}))
    if hygiene:
        manifest.setdefault("warnings", []).append(hygiene)
        log.warning("%s", hygiene)


def claim_machines(hosts: Sequence[InventoryHost], event: Callable[[str, str], None]) -> None:
    """Hold every machine for this run before any trial starts (and sweep what killed
    runs left there, recorded as an event); HostBusy (exit 2, the run's folder removed)
    when another run holds one. A machine that does not answer is left to the pool,
    which drains it."""
    claimed = []
    try:
        for h in hosts:
            try:
                removed = h.claim()
                claimed.append(h)
                if removed:
                    event("machine-swept", f"{h.machine.name}: {'; '.join(removed)}")
            except HostBusy:
                raise
            except DensitylabError as e:
                log.warning("%s: not claimed now: %s", h.machine.name, e)
    except HostBusy:
        for h in [*claimed, *hosts]:
            with contextlib.suppress(DensitylabError):
                h.close()
        raise


def set_aside(st: store.RunStore, trial_id: str) -> None:
    """Move a trial's folder to unfinished/<id>.<n> (its console logs and records kept
    for the post-mortem), so that a rerun starts clean."""
    d = st.trial_dir(trial_id)
    if not d.is_dir():
        return
    n = 1
    while (st.root / "unfinished" / f"{trial_id}.{n}").exists():
        n += 1
    (st.root / "unfinished").mkdir(exist_ok=True)
    d.rename(st.root / "unfinished" / f"{trial_id}.{n}")


def fail_unrun(
    ctx: RunContext, trial: plan.Trial, reason: str, on_result: Callable[[TrialResult], None]
) -> None:
    """A trial that never started: its row says why."""
    res = TrialResult(
        trial.trial_id, trial.kernel, "", trial.fleet_size, trial.repeat, "machine",
        ctx.spec.fleet.memory_mib, ctx.spec.workload.mib, reason=reason,
    )  # fmt: skip
    ctx.store.write_trial_tables(trial.trial_id, {"trials": pd.DataFrame([asdict(res)])})
    on_result(res)


def machine_hygiene(machines: dict[str, dict[str, Any]]) -> str | None:
    """A/B hygiene across machines: trials of one kernel on hardware unlike the other's
    move figures by more than the kernel. Each machine runs every kernel here, so this
    says the machines differ, and how."""
    fields = ("cpu_model", "mem_total_mib", "cpus", "firmware")
    differ = [
        f"{f}: " + " vs ".join(f"{name} {m.get(f)}" for name, m in sorted(machines.items()))
        for f in fields
        if len({str(m.get(f)) for m in machines.values()}) > 1
    ]
    if not differ:
        return None
    return "machines differ (" + "; ".join(differ) + "): compare kernels within a machine"


def finish_run(st: store.RunStore, manifest: dict[str, Any]) -> None:
    """Fold trial parts into run tables and write the manifest with checksums."""
    manifest["files"] = st.rebuild_run_tables()
    manifest["ended_at"] = store.utc_now()
    st.write_manifest(manifest)
