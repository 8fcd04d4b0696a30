"""Trials on lab machines from an inventory, through the one trial engine: two lab-host
VMs reached over SSH on loopback ports (orchestrator.labvms), switched between the lab
image's 6.12 and 7.3 kernels by kexec, kprobes timing the walks on both, nothing left on
the machines afterwards. And a machine destroyed mid-trial: its trial fails with the
reason and is rerun on the other machine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import fleet, labvms, runner
from orchestrator import inventory as inv
from orchestrator.errors import HostError
from tests.labvmset import lab_vms

pytestmark = [pytest.mark.system, pytest.mark.slow]

SPEC = """\
name: inv-ci
host: {kind: inventory, inventory: %s, pattern: lab, switch_timeout_s: 240}
kernels: ["6.12", "7.3"]
fleet: {count: 1}
workload: {mib: 8, dup: 1.0}
host_workload: {copies: 2, mib: 8, fragment_vmas: 500}
ksm: {pages_to_scan: 5000, sleep_millisecs: 10}
phases:
  merge: {timeout_s: 240, settle_scans: 3}
  migrate: {enabled: true, repeats: 1, settle_s: 0, pages: 512}
  reclaim: {enabled: true, swap_mib: 128, reclaim_mib: 8, settle_s: 0}
  attribute: {enabled: false}
latency: {method: kprobe}
repeats: %d
"""


def machines(vms: labvms.LabVms) -> list[inv.Machine]:
    return inv.load_inventory(Path(vms.inventory), "lab")


def leftovers(m: inv.Machine, tag: str) -> list[str]:
    """What a run could have left on a machine: its folder, cgroups, swap, probes, KSM."""
    found = []
    with inv.SshTransport(m) as t:
        if t.run(["/bin/sh", "-c", f"ls -d /run/densitylab/{tag} 2>/dev/null || true"]).strip():
            found.append(f"/run/densitylab/{tag}")
        cgs = t.run(["/bin/sh", "-c", "ls -d /sys/fs/cgroup/densitylab-* 2>/dev/null || true"])
        found += cgs.split()
        swaps = t.run(["cat", "/proc/swaps"]).splitlines()[1:]
        found += [f"swap {s.split()[0]}" for s in swaps]
        probes = t.run(["cat", "/sys/kernel/tracing/kprobe_events"]).strip()
        found += [f"kprobe {p}" for p in probes.splitlines()]
        if t.run(["cat", "/sys/kernel/mm/ksm/run"]).strip() != "0":
            found.append("KSM still running")
    return found


@pytest.fixture()
def vms(lab: None, tmp_path: Path) -> Iterator[labvms.LabVms]:
    with lab_vms(tmp_path / "vms") as started:
        yield started


def test_trials_spread_over_two_machines_with_kexec(vms: labvms.LabVms, tmp_path: Path) -> None:
    spec = tmp_path / "inv.yaml"
    spec.write_text(SPEC % (vms.inventory, 2))
    t0 = time.monotonic()
    outcome = runner.run_experiment(spec, tmp_path / "r")
    print(f"inventory run: {time.monotonic() - t0:.0f} s")
    assert outcome.ok, [(r.trial_id, r.reason) for r in outcome.results]
    run = outcome.store.root
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 4
    # Each machine ran both kernels (no kernel confounded with one machine).
    assert set(trials.host) == {"machine vm0", "machine vm1"}
    assert (trials.groupby("host").kernel.nunique() == 2).all(), trials[["host", "kernel"]]
    for _, t in trials.iterrows():
        assert t.kernel_release.startswith(t.kernel + "."), t.kernel_release
    events = pd.read_parquet(run / "events.parquet")
    switches = events[events.event == "kernel-switch"]
    assert len(switches) >= 2 and switches.detail.str.contains("kexec").all()
    print("\n".join(switches.detail))
    lat = pd.read_parquet(run / "latency.parquet")
    assert (lat.method == "kprobe").all()
    per = lat[lat.trigger == "migrate"].groupby("kernel").size()
    assert set(per.index) == {"6.12", "7.3"} and (per > 50).all(), per.to_dict()
    frag = lat[lat.target.fillna("").str.startswith("fragmented")]
    assert len(frag) and (frag.vmas == 500).all()
    manifest = outcome.store.read_manifest()
    assert set(manifest["machines"]) == {"vm0", "vm1"}
    assert all(m["cpu_model"] for m in manifest["machines"].values())
    tag = run.name.replace("-", "_")
    for m in machines(vms):
        assert leftovers(m, tag) == [], m.name
        with inv.SshTransport(m) as t:  # back on the kernel it ran before
            assert t.run(["uname", "-r"]).strip().startswith("6.12.")


def test_machine_destroyed_mid_trial_is_drained(vms: labvms.LabVms, tmp_path: Path) -> None:
    """Failure injection (the real part cannot be told to die on cue): vm0's domain is
    destroyed while it runs a trial; that trial is rerun on vm1 and the run succeeds."""
    spec = tmp_path / "inv.yaml"
    spec.write_text(SPEC % (vms.inventory, 1))
    vm0 = machines(vms)[0]
    victim = vms.names[0]
    destroyed = threading.Event()

    def destroy_when_busy() -> None:
        deadline = time.monotonic() + 600
        with inv.SshTransport(vm0) as t:
            while time.monotonic() < deadline:
                try:
                    out = t.run(["/bin/sh", "-c", "cat /run/densitylab/*/*/pattern-0.out"])
                except HostError:
                    out = ""
                if "DLFILL DONE" in out:
                    break
                time.sleep(1)
        conn = fleet.connect()
        try:
            conn.lookupByName(victim).destroy()
            destroyed.set()
        finally:
            conn.close()

    killer = threading.Thread(target=destroy_when_busy, daemon=True)
    killer.start()
    outcome = runner.run_experiment(spec, tmp_path / "r")
    killer.join(timeout=60)
    assert destroyed.is_set(), "vm0 never got busy"
    assert outcome.ok, [(r.trial_id, r.reason) for r in outcome.results]
    trials = pd.read_parquet(outcome.store.root / "trials.parquet")
    assert len(trials) == 2 and (trials.host == "machine vm1").all()
    events = outcome.store.read_manifest()["events"]
    drained = [e for e in events if e["event"] == "machine-drained"]
    assert len(drained) == 1 and drained[0]["detail"].startswith("vm0:"), events
    assert (outcome.store.root / "unfinished").is_dir()  # the failed attempt, kept aside
    tag = outcome.store.root.name.replace("-", "_")
    assert leftovers(machines(vms)[1], tag) == []
