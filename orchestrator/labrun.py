"""Trials inside a lab-host VM that boots the kernel under test.

The lab host is driven like any remote lab machine: the host agent and dlfill are
copied in, and every step is a host-agent subcommand run through the guest agent
(`spawn`, `ksm-apply`, `trace`, `swap-on`, `reclaim`, ...). Nothing inside the VM is
special-cased, so the same steps can drive a physical machine. Under TCG a nested
fleet would be ~60x slower, so guest-memory workloads run as processes on the lab host
with the same fill patterns (labelled `host-process` in the data).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import (
    dlfill,
    fleet,
    hostagent,
    images,
    integrity,
    kernelspec,
    labimage,
    plan,
    sampling,
    triggers,
)
from orchestrator.attribution import Target, Window, attribute, pattern_mappings
from orchestrator.errors import GuestError, HostError
from orchestrator.interrupts import InterruptGuard, TeardownStack
from orchestrator.sampling import PhaseMark, settled, sharing_pages
from orchestrator.spec import Spec

log = logging.getLogger(__name__)

AGENT_PATH = "/opt/densitylab/hostagent.py"
DLFILL_PATH = "/usr/local/bin/dlfill"
WORK = "/run/densitylab"
PAGES_PER_MIB = 256


@dataclass
class LabState:
    """What one lab trial accumulates; turned into tables like a local trial's."""

    t0_ns: int = 0  # the lab host's CLOCK_MONOTONIC at trial start
    marks: list[PhaseMark] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    procs: dict[str, int] = field(default_factory=dict)  # name -> pid inside the lab host
    windows: list[Window] = field(default_factory=list)  # one workload acted on at a time
    facts: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    integrity: integrity.IntegrityLog = field(default_factory=integrity.IntegrityLog)


class LabHost:
    """One booted lab host reached through its guest agent."""

    def __init__(self, fl: fleet.Fleet, name: str):
        self.fl = fl
        self.name = name

    def run(self, argv: list[str], timeout_s: float = 120) -> str:
        r = self.fl.guest_exec(self.name, argv, timeout_s=timeout_s)
        if r.rc != 0:
            raise GuestError(
                self.name, f"{' '.join(argv)} exited {r.rc}: {r.stderr.strip()[-300:]}"
            )
        return r.stdout

    def agent(self, *args: str, timeout_s: float = 120) -> str:
        return self.run(["/usr/bin/python3", AGENT_PATH, *args], timeout_s)

    def now_ns(self) -> int:
        return int(self.agent("now").strip())

    def read(self, path: str) -> str:
        return self.fl.read_file(self.name, path).decode(errors="replace")

    def jsonl(self, path: str) -> list[dict[str, Any]]:
        try:
            text = self.read(path)
        except GuestError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def boot_lab_host(
    fl: fleet.Fleet, spec: Spec, kernel: str, store_dir: Path, run_id: str, token: str
) -> LabHost:
    """Define and boot the lab host with the kernel labelled `kernel`; push our tools."""
    image = labimage.find_lab_image()
    k = labimage.resolve_kernel(image, kernelspec.entry_for(spec.kernels, kernel))
    name = f"dl-{token}-lab-{kernel.replace('.', '_')}"
    gs = fleet.GuestSpec(
        name=name,
        memory_mib=spec.host.memory_mib,
        vcpus=spec.host.vcpus,
        image=fleet.GuestImage(
            kernel=k.vmlinuz, initrd=k.initrd, disk=image.rootfs, cmdline=image.cmdline
        ),
        console_log=store_dir / "console" / f"{name}.log",
        overlay=fleet.OVERLAY_ROOT / run_id / f"{name}.qcow2",
        numa_cells=spec.host.numa_cells,
    )
    fl.define([gs])
    fl.start_all()
    fl.wait_ready(spec.host.boot_timeout_s)
    host = LabHost(fl, name)
    host.run(["/bin/mkdir", "-p", "/opt/densitylab", WORK])
    fl.write_file(name, AGENT_PATH, Path(hostagent.__file__).read_bytes(), 0o644)
    # The same static binary as the tiny guest's and the host's.
    fl.write_file(name, DLFILL_PATH, images.host_dlfill().read_bytes(), 0o755)
    return host


def start_workloads(
    host: LabHost, spec: Spec, trial: plan.Trial, st: LabState, cgroup: str
) -> None:
    """Guest-memory patterns as processes (fleet.count of them) and the fragmented copies,
    each in a memory cgroup of its own (`cgroup`-NAME), so that reclaim can act on one
    workload at a time and every walk it causes is that workload's."""
    w, hw, seed = spec.workload, spec.host_workload, spec.workload_seed
    jobs: dict[str, list[str]] = {}
    for i in range(trial.fleet_size):
        jobs[f"pattern-{i}"] = [
            DLFILL_PATH,
            "--mib",
            str(w.mib),
            "--dup",
            str(w.dup),
            "--zero",
            str(w.zero),
            "--unique",
            str(w.unique),
            "--volatile",
            str(w.volatile),
            "--volatile-rate",
            str(w.volatile_rate_pps),
            "--seed",
            str(seed),
            "--instance",
            str(i),
            "--mergeable",
            "--hold",
            *(["--one-content"] if w.pattern == "one-content" else []),
        ]
    for i in range(hw.copies):
        jobs[f"fragmented-{i}"] = images.fragmented_copy_argv(
            DLFILL_PATH,
            hw.mib,
            trial.vmas,
            spec.host_workload_seed,
            i,
            one_content=hw.pattern == "one-content",
        )
    st.result["patterns"] = {
        n: (w.pattern if n.startswith("pattern-") else hw.pattern) for n in jobs
    }
    # Start on node 0, so that migrating 0 -> 1 moves every page (then 1 -> 0).
    bind = ["/usr/bin/numactl", "--membind=0", "--"] if spec.host.numa_cells > 1 else []
    for name, argv in jobs.items():
        pid = host.agent(
            "spawn",
            "--out",
            f"{WORK}/{name}.out",
            "--pidfile",
            f"{WORK}/{name}.pid",
            "--cgroup",
            f"{cgroup}-{name}",
            "--",
            *bind,
            *argv,
        )
        st.procs[name] = int(pid.strip())
    for name in jobs:
        st.result.setdefault("fills", {})[name] = wait_done_line(host, f"{WORK}/{name}.out")


def wait_done_line(host: LabHost, path: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in host.read(path).splitlines():
            if (done := dlfill.done_record(line)) is not None:
                return done
            if line.startswith("dlfill: "):
                raise GuestError(host.name, f"{path}: {line}")
        time.sleep(0.5)
    raise GuestError(host.name, f"{path}: no DLFILL DONE line within {timeout_s:.0f}s")


def verify_lab_workloads(host: LabHost, st: LabState) -> list[integrity.Verification]:
    """Every dlfill on the lab host checks its pages; the line lands in its .out file."""

    def send(pid: int) -> None:
        host.run(["/usr/bin/kill", "-USR2", str(pid)])

    return integrity.verify_processes(
        st.procs, send, lambda name: host.read(f"{WORK}/{name}.out"), poll_s=0.5
    )


def watch_integrity(host: LabHost, spec: Spec, st: LabState, stack: ExitStack) -> None:
    """Verify the lab workloads from now on; the check after swap-in runs when the
    triggers' stack has turned swap off (callbacks pushed now unwind after theirs), and
    only when the trial got there without an error."""
    st.integrity.clock = host.now_ns
    st.integrity.add_source(lambda: verify_lab_workloads(host, st))

    def after_swap_off(exc_type: type[BaseException] | None, *_: Any) -> bool:
        if exc_type is None and spec.phases.reclaim.enabled:
            st.integrity.check("restore")
        return False

    stack.push(after_swap_off)


def wait_merged(host: LabHost, spec: Spec, guard: InterruptGuard, timeout_s: float) -> bool:
    """Poll the lab host's samples until sharing settles (same rule as local trials)."""
    m = spec.phases.merge
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        guard.check()
        seen = [
            (int(s["ksm"]["full_scans"]), sharing_pages(s))
            for s in host.jsonl(f"{WORK}/samples.jsonl")
        ]
        if seen and seen[-1][1] > 0 and settled(seen, m.settle_scans, m.settle_pct):
            return True
        time.sleep(2)
    return False


def lab_phases(
    host: LabHost,
    spec: Spec,
    trial: plan.Trial,
    st: LabState,
    guard: InterruptGuard,
    stack: ExitStack,
    on_phase: Callable[[str], None],
) -> None:
    """Workloads, KSM, merge, then migrate and reclaim with kprobe timing; every step's
    undo is on the stack (the VM itself goes last)."""
    tag = f"lab{trial.repeat}"
    cgroup = f"densitylab-{tag}"

    def phase(name: str) -> None:
        on_phase(name)
        st.marks.append(PhaseMark(name, host.now_ns()))
        st.events.append(
            {"ts_ns": st.marks[-1].ts_ns, "phase": name, "event": "phase-start", "detail": ""}
        )

    st.facts = json.loads(host.agent("probe", "--no-bpf", timeout_s=120))
    st.t0_ns = host.now_ns()
    phase("fill")
    stack.callback(stop_all, host, st)
    start_workloads(host, spec, trial, st, cgroup)
    pids = [f"--pid={n}={p}" for n, p in st.procs.items()]
    host.agent(
        "spawn",
        "--out",
        f"{WORK}/sampler.log",
        "--pidfile",
        f"{WORK}/sampler.pid",
        "--",
        "/usr/bin/python3",
        AGENT_PATH,
        "sample",
        "--interval-s",
        str(spec.sampling.interval_s),
        "--out",
        f"{WORK}/samples.jsonl",
        *pids,
    )
    phase("merge")
    knobs = [f"{k}={v}" for k, v in {**spec.ksm, "run": 1}.items()]
    host.agent("ksm-apply", "--saved", f"{WORK}/ksm.json", *knobs)
    stack.callback(host.agent, "ksm-restore", "--saved", f"{WORK}/ksm.json")
    t0 = time.monotonic()
    st.result["settled"] = wait_merged(host, spec, guard, spec.phases.merge.timeout_s)
    st.result["settle_s"] = time.monotonic() - t0
    st.result["ksm_knobs"] = {
        **st.facts["ksm"].get("knobs", {}),
        **{k: str(v) for k, v in spec.ksm.items()},
    }
    watch_integrity(host, spec, st, stack)
    st.integrity.check("merge")
    lab_triggers(host, spec, st, guard, stack, phase, tag, cgroup)
    phase("teardown")


def lab_triggers(
    host: LabHost,
    spec: Spec,
    st: LabState,
    guard: InterruptGuard,
    stack: ExitStack,
    phase: Callable[[str], None],
    tag: str,
    cgroup: str,
) -> None:
    p = spec.phases
    wanted = [t for t, on in (("migrate", p.migrate.enabled), ("reclaim", p.reclaim.enabled)) if on]
    chosen = triggers.pick_latency(spec.latency.method, st.facts["tracing"]["value"], wanted)
    method = chosen.method
    st.result["latency_method"] = method
    st.result["latency_notes"] = "; ".join(f"{t}: {n}" for t, n in chosen.notes.items()) or None
    if method and method != "none":
        start_collector(host, method, tag, f"{WORK}/latency.jsonl", f"{WORK}/collector.log")
        stack.callback(stop_trial_collector, host, st)
    nodes = int(st.facts["numa"]["value"])
    for i in range(p.migrate.repeats if p.migrate.enabled else 0):
        guard.check()
        phase("migrate")
        lab_migrate(host, spec, st, nodes, i)
        time.sleep(p.migrate.settle_s)
        st.integrity.check("migrate", i)
    if p.reclaim.enabled:
        guard.check()
        host.agent(
            "swap-on",
            "--kind",
            p.reclaim.swap,
            "--mib",
            str(p.reclaim.swap_mib),
            "--saved",
            f"{WORK}/swap.json",
        )
        stack.callback(host.agent, "swap-off", "--saved", f"{WORK}/swap.json", timeout_s=900)
        for j in range(p.reclaim.repeats):
            guard.check()
            phase("reclaim")
            lab_reclaim(host, spec, st, cgroup)
            time.sleep(p.reclaim.settle_s)
            st.integrity.check("reclaim", j)
    phase("restore")


def lab_migrate(host: LabHost, spec: Spec, st: LabState, nodes: int, repeat: int) -> None:
    """One NUMA pass (0 -> 1, then back), one process at a time, each window on the lab
    host's clock: every walk in it is for that process's pages. The agent reports its
    own window: each extra agent call costs seconds in a TCG lab host."""
    if nodes < 2:
        raise HostError("lab host has one NUMA node: host.numa_cells must be 2 or more")
    src, dst = (0, 1) if repeat % 2 == 0 else (1, 0)
    pages = spec.phases.migrate.pages
    t0 = time.monotonic()
    for name, pid in st.procs.items():
        if pages is None:
            start = host.now_ns()
            host.run(["/usr/bin/migratepages", str(pid), str(src), str(dst)], timeout_s=3600)
            end, detail = host.now_ns(), f"{name}: all pages"
        else:
            out = json.loads(
                host.agent(
                    "move-pages",
                    "--pid",
                    str(pid),
                    "--pages",
                    str(pages),
                    "--node",
                    str(dst),
                    timeout_s=3600,
                )
            )
            start, end = out.pop("start_ns"), out.pop("end_ns")
            detail = f"{name}: move_pages {json.dumps(out)}"
        st.windows.append(Window(start, end, name, "migrate"))
        st.events.append(lab_event(end, "migrate", "migrated-process", detail))
    took = f"numa {src}->{dst} in {time.monotonic() - t0:.2f}s"
    st.events.append(lab_event(st.windows[-1].end_ns, "migrate", "migrated", took))


def lab_reclaim(host: LabHost, spec: Spec, st: LabState, cgroup: str) -> None:
    """memory.reclaim on one workload's cgroup at a time, in recorded windows."""
    r = spec.phases.reclaim
    for name in st.procs:
        out = json.loads(
            host.agent(
                "reclaim",
                "--json",
                "--cgroup",
                f"{cgroup}-{name}",
                "--mib",
                str(r.reclaim_mib),
                timeout_s=3600,
            )
        )
        st.windows.append(Window(out["start_ns"], out["end_ns"], name, "reclaim"))
        detail = f"{name}: memory.reclaim {r.reclaim_mib} MiB: {out['result']}"
        st.events.append(lab_event(out["end_ns"], "reclaim", "reclaimed", detail))


def lab_event(ts_ns: int, phase: str, event: str, detail: str) -> dict[str, Any]:
    return {"ts_ns": ts_ns, "phase": phase, "event": event, "detail": detail}


def start_collector(host: LabHost, method: str, tag: str, out: str, log: str) -> None:
    """Start the host agent's latency collector (pidfile beside its log) and wait until
    its probes are in place."""
    host.agent(
        "spawn",
        "--out",
        log,
        "--pidfile",
        log.removesuffix(".log") + ".pid",
        "--",
        "/usr/bin/python3",
        AGENT_PATH,
        "trace",
        "--method",
        method,
        "--out",
        out,
        "--tag",
        tag,
    )
    deadline = time.monotonic() + 60
    while "collector: ready" not in host.read(log):
        if time.monotonic() > deadline:
            raise HostError(f"lab collector did not start: {host.read(log)[-500:]}")
        time.sleep(0.3)


def stop_collector(host: LabHost, log: str) -> bool:
    """Stop a collector, giving it time to drain its buffer (a slow VM parses ~10^4
    events/s). True when it removed its probes and stopped by itself."""
    pidfile = log.removesuffix(".log") + ".pid"
    host.agent("stop", "--pidfile", pidfile, "--grace-s", "600", timeout_s=660)
    return "collector: stopped" in host.read(log)


def stop_trial_collector(host: LabHost, st: LabState) -> None:
    """A collector that had to be killed is said in the trial's events."""
    if not stop_collector(host, f"{WORK}/collector.log"):
        st.events.append(
            {
                "ts_ns": host.now_ns(),
                "phase": "restore",
                "event": "collector-killed",
                "detail": "did not drain within 600 s: latency samples are incomplete",
            }
        )


def stop_all(host: LabHost, st: LabState) -> None:
    """Stop workloads and the sampler, then take the sampler's and collector's files."""
    for name in [*st.procs, "sampler"]:
        host.agent("stop", "--pidfile", f"{WORK}/{name}.pid")
    st.samples = host.jsonl(f"{WORK}/samples.jsonl")


def run_lab_trial(ctx: Any, trial: plan.Trial, res: Any, st: LabState) -> None:
    """Boot the lab host for trial.kernel, run the phases, tear it all down; what was
    measured is in `st` even when this raises."""
    token = ctx.store.run_id.rsplit("-", 1)[-1] + f"{int(time.time()) % 100000:05d}"
    trial_dir = ctx.store.trial_dir(trial.trial_id)
    with TeardownStack(ctx.guard) as stack:
        fl = stack.enter_context(
            fleet.Fleet(ctx.conn, ctx.store.run_id, trial.trial_id, ctx.domain_type)
        )
        ctx.progress.phase(trial.trial_id, "boot")
        host = boot_lab_host(fl, ctx.spec, trial.kernel, trial_dir, ctx.store.run_id, token)
        if fl.guests[0].boot_retries:
            st.events.append(
                {
                    "ts_ns": host.now_ns(),
                    "phase": "boot",
                    "event": "boot-retry",
                    "detail": "kernel panic before ready (TCG); booted once more, console kept",
                }
            )
        try:
            with TeardownStack(ctx.guard) as inner:
                lab_phases(
                    host,
                    ctx.spec,
                    trial,
                    st,
                    ctx.guard,
                    inner,
                    lambda name: ctx.progress.phase(trial.trial_id, name),
                )
        finally:
            st.latency = host.jsonl(f"{WORK}/latency.jsonl")
            for name in ("samples.jsonl", "latency.jsonl", "collector.log"):
                with_file(host, name, trial_dir)
    res.kernel_release = st.facts.get("kernel_release", {}).get("value", "")


def with_file(host: LabHost, name: str, trial_dir: Path) -> None:
    """Keep a copy of a lab-host file in the run directory (missing files are fine)."""
    try:
        data = host.fl.read_file(host.name, f"{WORK}/{name}")
    except GuestError:
        return
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / f"lab-{name}").write_bytes(data)


def lab_tables(st: LabState, res: Any) -> dict[str, pd.DataFrame]:
    """The run-store tables of a lab trial (same schema as a local trial's)."""
    tid = res.trial_id
    procs = sampling.process_table(st.samples, tid, st.t0_ns, st.marks)
    tables = {
        "ksm_samples": sampling.ksm_table(st.samples, tid, st.t0_ns, st.marks),
        "vmstat_samples": sampling.vmstat_table(st.samples, tid, st.t0_ns, st.marks),
        "process_samples": procs,
        "phase_deltas": sampling.phase_deltas(st.samples, tid, st.marks),
    }
    events = pd.DataFrame(st.events, columns=["ts_ns", "phase", "event", "detail"])
    events.insert(0, "trial_id", tid)
    events["t_s"] = (events["ts_ns"] - st.t0_ns) / 1e9
    tables["events"] = events
    lat = pd.DataFrame(
        st.latency,
        columns=["ts_ns", "duration_ns", "method", "lower_bound", "pid", "comm", "caller"],
    )
    lat.insert(0, "trial_id", tid)
    lat.insert(1, "kernel", res.kernel)
    lat.insert(2, "trigger", sampling.label_phases(lat["ts_ns"], st.marks) if len(lat) else [])
    lat["t_s"] = (lat["ts_ns"] - st.t0_ns) / 1e9
    attribute(lat, st.windows, lab_targets(st))
    tables["latency"] = lat
    tables["integrity"] = st.integrity.table(tid, st.t0_ns)
    fills = st.result.get("fills", {})
    tables["guests"] = pd.DataFrame(
        [
            {
                "trial_id": tid,
                "guest": name,
                "workload_kind": "host-process",
                **{
                    k: d.get(k)
                    for k in (
                        "fill_s",
                        "dup_pages",
                        "zero_pages",
                        "unique_pages",
                        "volatile_pages",
                        "vmas",
                    )
                },
            }
            for name, d in fills.items()
        ]
    )
    return tables


def lab_targets(st: LabState) -> dict[str, Target]:
    """Every lab workload as a latency target: its own VMA count (from dlfill's done
    line) and the mappings its pattern gives each KSM page."""
    fills: dict[str, dict[str, Any]] = st.result.get("fills", {})
    mps = int(st.result.get("ksm_knobs", {}).get("max_page_sharing", 256))
    patterns = st.result.get("patterns", {})
    out = {}
    for name, d in fills.items():
        group = [n for n in fills if n.rsplit("-", 1)[0] == name.rsplit("-", 1)[0]]
        pattern = patterns.get(name, "one-content" if d.get("one_content") else "distinct")
        kind = "host-copy" if name.startswith("fragmented-") else "host-process"
        pages = int(d.get("dup_pages") or 0)
        out[name] = Target(
            name, kind, pattern, d.get("vmas"), pattern_mappings(pattern, pages, len(group), mps)
        )
    return out
