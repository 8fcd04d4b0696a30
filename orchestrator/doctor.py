"""`densitylab doctor`: what this host allows, each fact with how it was detected."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestrator import fleet
from orchestrator.agent import probe
from orchestrator.errors import HostError


@dataclass
class DoctorReport:
    facts: dict[str, Any]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "facts": self.facts}


def probe_libvirt() -> dict[str, Any]:
    try:
        conn = fleet.connect()
    except HostError as e:
        return probe.fact(None, str(e))
    try:
        v = fleet.versions(conn)
    finally:
        conn.close()
    return probe.fact(v, f"{fleet.URI} answered getLibVersion/getVersion", **v)


def problems_of(facts: dict[str, Any]) -> list[str]:
    """Why a density run cannot proceed here (empty when it can)."""
    out = []
    if os.geteuid() != 0:
        out.append("not root: KSM knobs, cgroups and libvirt's system instance need root")
    if not facts["ksm"]["value"]:
        out.append(f"KSM not usable: {facts['ksm']['how']}")
    if facts["libvirt"]["value"] is None:
        out.append(f"libvirt not reachable: {facts['libvirt']['how']}")
    if not os.path.exists(fleet.EMULATOR):
        out.append(f"{fleet.EMULATOR} missing: run 'make setup'")
    return out


def run_doctor(check_bpf: bool = True) -> DoctorReport:
    facts = probe.probe_host(check_bpf=check_bpf)
    facts["libvirt"] = probe_libvirt()
    return DoctorReport(facts, problems_of(facts))


def show(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return " ".join(f"{k} {v}" for k, v in value.items())
    return "unavailable" if value is None else str(value)


LABELS = {
    "kernel_release": "kernel",
    "accel": "accelerator",
    "ksm": "KSM writable",
    "cgroup": "memory cgroup",
    "swap": "swap methods",
    "numa": "NUMA nodes",
    "tracing": "rmap_walk_ksm timing",
    "memory": "memory MiB",
    "cpus": "CPUs",
    "libvirt": "libvirt",
}


def render_lines(report: DoctorReport) -> list[str]:
    """One line per fact: label, value, and (how it was detected)."""
    lines = [
        f"{LABELS.get(k, k):<22} {show(f['value']):<28} ({f['how']})"
        for k, f in report.facts.items()
    ]
    verdict = "ready for a density run" if report.ok else "NOT ready: " + "; ".join(report.problems)
    return [*lines, f"{'verdict':<22} {verdict}"]
