"""`densitylab lab check|prepare`: what the machines of an inventory can do, and making
them ready. SSH is inventory.py's; plays are workload.py's (ansible-runner)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import inventory as inv
from orchestrator import spec as specmod
from orchestrator.errors import DensitylabError, UsageError

log = logging.getLogger(__name__)

MAX_PARALLEL = 16
CHECK_TIMEOUT_S = 120
COLUMNS = ("machine", "kernel", "KVM", "KSM", "cgroup", "NUMA", "tracing", "free MiB", "CPU model")


@dataclass(frozen=True)
class MachineCheck:
    """One machine's doctor: its facts, or why it could not be asked; what it lacks."""

    machine: inv.Machine
    facts: dict[str, Any] | None  # the host agent's `probe` (None: not reached)
    cpu_model: str
    problems: tuple[str, ...]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not self.problems


def cpu_model(cpuinfo: str) -> str:
    """The first `model name` of /proc/cpuinfo (x86), else an empty string."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def probe(t: inv.SshTransport) -> tuple[dict[str, Any], str]:
    """The host agent's facts and the CPU model of a machine (the agent is shipped first)."""
    inv.ship_agent(t)
    facts = json.loads(t.agent("probe", "--no-bpf", timeout_s=CHECK_TIMEOUT_S))
    return facts, cpu_model(t.read("/proc/cpuinfo").decode(errors="replace"))


def spec_problems(spec: specmod.Spec, facts: dict[str, Any]) -> list[str]:
    """Why this machine cannot run the spec's trials (the fleet runs on the machine)."""
    out = []
    if not facts["ksm"]["value"]:
        out.append(f"KSM not usable: {facts['ksm']['how']}")
    try:
        specmod.check_fits_host(spec, int(facts["memory"]["available_mib"]), "spec")
    except UsageError as e:
        out.append(str(e).removeprefix("spec: "))
    ph = spec.phases
    if ph.migrate.enabled and ph.migrate.method == "numa" and int(facts["numa"]["value"]) < 2:
        out.append(
            f"phases.migrate.method numa needs 2 NUMA nodes, machine has {facts['numa']['value']}"
        )
    reclaim_needs = {"memory.reclaim": "v2", "v1-limit-steps": "v1"}.get(ph.reclaim.method)
    if ph.reclaim.enabled and reclaim_needs and facts["cgroup"]["value"] != reclaim_needs:
        out.append(f"phases.reclaim.method {ph.reclaim.method} needs cgroup {reclaim_needs}")
    method = spec.latency.method
    if method not in ("auto", "none") and method not in (facts["tracing"]["value"] or []):
        out.append(f"latency.method {method} not available: {facts['tracing']['how']}")
    return out


def check_machine(m: inv.Machine, known_hosts: Path, spec: specmod.Spec | None) -> MachineCheck:
    """Never raises for a machine's own trouble: it becomes the check's problem."""
    t0_ns = time.monotonic_ns()
    facts, model, problems = None, "", []
    try:
        with inv.SshTransport(m, known_hosts) as t:
            facts, model = probe(t)
        if spec is not None:
            problems = spec_problems(spec, facts)
    except inv.Unreachable as e:
        problems = [f"unreachable: {e.reason}"]
    except DensitylabError as e:
        problems = [str(e).removeprefix(f"{m.name}: ")]
    return MachineCheck(m, facts, model, tuple(problems), (time.monotonic_ns() - t0_ns) / 1e9)


def check_all(
    machines: Sequence[inv.Machine],
    known_hosts: Path | None = None,
    spec: specmod.Spec | None = None,
) -> list[MachineCheck]:
    """Every machine's check, in parallel, in inventory order."""
    with tempfile.TemporaryDirectory(prefix="dl-lab-") as tmp:
        kh = known_hosts or Path(tmp) / "known_hosts"
        with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(machines)))) as pool:
            return list(pool.map(lambda m: check_machine(m, kh, spec), machines))


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "?" if value is None else str(value)


def row(c: MachineCheck) -> tuple[str, ...]:
    """One table row; a machine not reached shows its reason instead of facts."""
    if c.facts is None:
        return (c.machine.name, *(["-"] * (len(COLUMNS) - 2)), "; ".join(c.problems))
    f = c.facts
    return (
        c.machine.name,
        show(f["kernel_release"]["value"]),
        show(f["accel"]["value"]),
        show(f["ksm"]["value"]),
        show(f["cgroup"]["value"]),
        show(f["numa"]["value"]),
        show(f["tracing"]["value"]),
        show(f["memory"].get("available_mib")),
        c.cpu_model or "?",
    )


# ---------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PrepareResult:
    stats: dict[str, dict[str, int]]  # machine -> ok/changed/failures/dark/skipped
    elapsed_s: float


def prepare(
    machines: Sequence[inv.Machine],
    data_dir: Path,
    known_hosts: Path | None = None,
    timeout_s: float = 1800,
) -> PrepareResult:
    """playbooks/lab-prepare.yml on every machine (apt, agent, libvirtd). Raises
    workload.PlayError naming the machines that failed."""
    from orchestrator import workload

    files = [{"src": str(src), "dest": dest, "mode": oct(mode)[2:].rjust(4, "0")}
             for dest, (src, mode) in inv.agent_files().items()]  # fmt: skip
    hosts = inv.inventory_yaml(machines)
    hosts["all"]["vars"] = {"ansible_python_interpreter": "/usr/bin/python3"}
    t0_ns = time.monotonic_ns()
    with tempfile.TemporaryDirectory(prefix="dl-ssh-") as control:
        kh = known_hosts or data_dir / "known_hosts"
        kh.parent.mkdir(parents=True, exist_ok=True)
        try:
            events = workload.run_machine_play(
                "lab-prepare",
                hosts,
                data_dir,
                extravars={"lab_packages": list(inv.LAB_PACKAGES), "agent_files": files},
                timeout_s=timeout_s,
                forks=min(MAX_PARALLEL, len(machines)),
                envvars=inv.ansible_ssh_env(Path(control), kh),
            )
        finally:
            inv.stop_masters(Path(control))
    return PrepareResult(workload.play_stats(events), (time.monotonic_ns() - t0_ns) / 1e9)


@dataclass
class SweepResult:
    """What `lab clean` did on one machine."""

    removed: list[str]
    errors: list[str]
    kept_for: str | None  # the run holding the machine now: its state was left alone
    note: str | None = None


def sweep(
    machines: Sequence[inv.Machine], known_hosts: Path | None = None
) -> dict[str, SweepResult]:
    """`clean --inventory`: on each machine, stop and remove what killed runs left (the
    agent's clean), then purge every package densitylab recorded installing (never one
    the machine had before, never the running kernel's, never the live run's)."""

    def one(m: inv.Machine) -> SweepResult:
        with inv.SshTransport(m, known_hosts) as t:
            keep, removed, errors = inv.sweep_run_state(t)
            removed += [f"package {p}" for p in inv.remove_installed(t, spare=keep)]
            stuck = None if keep else inv.on_installed_kernel(t)
            note = (
                f"runs a kernel run {stuck} installed; reboot it to return to its default entry"
                if stuck
                else None
            )
            return SweepResult(removed, errors, keep, note)

    with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL, len(machines)))) as pool:
        return dict(zip((m.name for m in machines), pool.map(one, machines), strict=True))
