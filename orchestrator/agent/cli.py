"""The agent's command line: one table of subcommands, each its arguments and handler.

Lab hosts drive the agent by these names, flags and outputs: keep them stable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import enough, hold, ksm, leftovers, memory, probe, procs, pyc, sample, trace
from .fs import PROC, AgentError, read_text

# One argument: its flags and argparse keywords.
Arg = tuple[tuple[str, ...], dict[str, Any]]


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], int]
    args: list[Arg] = field(default_factory=list)


def arg(*flags: str, **kw: Any) -> Arg:
    return flags, kw


def report_errors(errors: list[str]) -> int:
    for e in errors:
        print(f"hostagent: {e}", file=sys.stderr)
    return 1 if errors else 0


def do_probe(a: argparse.Namespace) -> int:
    print(json.dumps(probe.probe_host(check_bpf=not a.no_bpf), indent=2))
    return 0


def do_sample(a: argparse.Namespace) -> int:
    pids = {k: int(v) for k, v in (x.split("=", 1) for x in a.pid)}
    sample.run_sampler(pids, a.interval_s, a.out, a.stop_after_s, a.parent_pid)
    return 0


def do_ksm_apply(a: argparse.Namespace) -> int:
    ksm.apply_ksm(dict(x.split("=", 1) for x in a.settings), a.saved)
    return 0


def do_ksm_restore(a: argparse.Namespace) -> int:
    return report_errors(ksm.restore_ksm(a.saved))


def do_trace(a: argparse.Namespace) -> int:
    trace.run_collector(a.method, a.out, a.tag, a.parent_pid)
    return 0


def do_spawn(a: argparse.Namespace) -> int:
    print(procs.spawn_detached(a.argv, a.out, a.pidfile, a.cgroup))
    return 0


def do_now(_a: argparse.Namespace) -> int:
    print(time.monotonic_ns())
    return 0


def do_stop(a: argparse.Namespace) -> int:
    """Each pidfile's process in turn, then each cgroup of ours: one call for a trial's
    workloads (each agent call costs a Python start-up, seconds in a TCG lab host)."""
    for pidfile in a.pidfile:
        procs.stop_pidfile(pidfile, a.grace_s)
    for name in a.cgroup or []:
        memory.memcg_remove(our_cgroup(name))
    return 0


def do_swap_on(a: argparse.Namespace) -> int:
    print(memory.swap_on(a.kind, a.mib, a.saved))
    return 0


def do_swap_off(a: argparse.Namespace) -> int:
    return report_errors(memory.swap_off(a.saved))


def our_cgroup(name: str) -> Path:
    """A cgroup of ours by name (made if absent: every cgroup subcommand may be first)."""
    return memory.memcg_create(name, read_text(PROC / "self" / "mounts"))


def do_reclaim(a: argparse.Namespace) -> int:
    """Each cgroup in turn, one line each: one call for every workload of a trial saves
    the caller a round trip per workload (seconds each in a TCG lab host)."""
    for name in a.cgroup:
        cg = our_cgroup(name)
        watch = walk_watch(a)
        start = time.monotonic_ns()
        got = enough.reclaim_until_tight(cg, a.mib << 20, watch)
        window = {"start_ns": start, "end_ns": time.monotonic_ns()}
        print(json.dumps({"cgroup": name, **got, **window}) if a.json else got["result"])
    return 0


def walk_watch(a: argparse.Namespace) -> enough.WalkWatch | None:
    """The stopping rule's watch over the BPF collector's raw file, when one is asked."""
    if a.tight_raw is None:
        return None
    return enough.WalkWatch(Path(a.tight_raw), a.tight_ci_pct, a.tight_min_walks)


def do_cgroup_create(a: argparse.Namespace) -> int:
    print(our_cgroup(a.cgroup))
    return 0


def do_cgroup_remove(a: argparse.Namespace) -> int:
    memory.memcg_remove(our_cgroup(a.cgroup))
    return 0


def do_move_pages(a: argparse.Namespace) -> int:
    """Each process in turn, one JSON line each, its window on this host's clock, so
    the caller needs no round trips for it (nor one call per process)."""
    for pid in a.pid:
        ranges = memory.mergeable_ranges(pid)
        total = sum((hi - lo) // 4096 for lo, hi in ranges)
        addrs = memory.sample_page_addresses(ranges, a.pages or total)
        watch = walk_watch(a)
        start = time.monotonic_ns()
        moved = enough.move_until_tight(pid, addrs, a.node, watch)
        print(json.dumps({"pid": pid, **moved, "start_ns": start, "end_ns": time.monotonic_ns()}))
    return 0


def do_verify(a: argparse.Namespace) -> int:
    """One JSON line per workload: its name and its DLFILL VERIFIED line."""
    workloads = {}
    for spec in a.proc:
        name, _, rest = spec.partition("=")
        pid, _, out = rest.partition(":")
        workloads[name] = (int(pid), Path(out))
    for name, line in procs.verify_workloads(workloads, a.timeout_s):
        print(json.dumps({"workload": name, "line": line}))
    return 0


def do_precompile(a: argparse.Namespace) -> int:
    print(f"{pyc.add_compiled(Path(a.archive))} modules compiled")
    return 0


def do_hold(a: argparse.Namespace) -> int:
    return hold.hold(a.run_id, a.controller)


def do_clean(a: argparse.Namespace) -> int:
    """Sweep what runs left here, except the live holder's; one JSON line. The holder
    itself (--holder RUN_ID, checked) sweeps everything: nothing of it is running yet."""
    keep = hold.holder()
    if a.holder is not None and keep != a.holder:
        raise AgentError(f"clean --holder {a.holder}: the machine is held by {keep}")
    removed, errors = leftovers.sweep_machine(None if a.holder else keep)
    print(json.dumps({"kept_for": keep, "removed": removed, "errors": errors}))
    return 0


PARENT_PID = arg("--parent-pid", type=int, help="stop when this process is gone")
SAVED = arg("--saved", type=Path, required=True)
CGROUP = arg("--cgroup", required=True)
CGROUPS = arg("--cgroup", action="append", required=True, help="repeat for several, in order")
# The stopping rule (enough.py): given the BPF collector's raw file, stop each window once
# every walk function's median is known to within --tight-ci-pct.
TIGHT = [
    arg("--tight-raw", help="the BPF collector's raw record file"),
    arg("--tight-ci-pct", type=float, default=5.0),
    arg("--tight-min-walks", type=int, default=400),
]

# In `--help` order (as before the split).
COMMANDS: dict[str, Command] = {
    "probe": Command(
        "print host capabilities as JSON",
        do_probe,
        [arg("--no-bpf", action="store_true", help="skip the BPF fentry attach test")],
    ),
    "sample": Command(
        "append JSON samples to a file until SIGTERM",
        do_sample,
        [
            arg("--interval-s", type=float, default=1.0),
            arg("--pid", action="append", default=[], metavar="NAME=PID"),
            arg("--out", type=Path, required=True),
            arg("--stop-after-s", type=float),
            PARENT_PID,
        ],
    ),
    "ksm-apply": Command(
        "save KSM knobs to a file, then set them",
        do_ksm_apply,
        [SAVED, arg("settings", nargs="+", metavar="KNOB=VALUE")],
    ),
    "trace": Command(
        "collect rmap_walk_ksm latency samples until SIGTERM",
        do_trace,
        [
            arg("--method", required=True, choices=list(trace.METHODS)),
            arg("--out", type=Path, required=True),
            arg("--tag", required=True, help="names our trace instance and kprobe group"),
            PARENT_PID,
        ],
    ),
    "spawn": Command(
        "start a command detached, optionally in a cgroup",
        do_spawn,
        [
            arg("--out", type=Path, required=True),
            arg("--pidfile", type=Path, required=True),
            arg("--cgroup", help="memory cgroup to join before exec"),
            arg("argv", nargs="+"),
        ],
    ),
    "now": Command("print CLOCK_MONOTONIC in ns (to line up remote phases)", do_now),
    "stop": Command(
        "stop processes started by spawn (then remove cgroups of ours)",
        do_stop,
        [
            arg("--pidfile", type=Path, action="append", required=True, help="repeatable"),
            arg("--grace-s", type=float, default=30, help="SIGKILL after this long"),
            arg("--cgroup", action="append", help="removed once the processes are stopped"),
        ],
    ),
    "swap-on": Command(
        "provide swap (zram or swapfile)",
        do_swap_on,
        [
            arg("--kind", choices=["zram", "swapfile"], default="zram"),
            arg("--mib", type=int, required=True),
            SAVED,
        ],
    ),
    "swap-off": Command("remove swap provided by swap-on", do_swap_off, [SAVED]),
    "reclaim": Command(
        "cgroup v2 memory.reclaim on cgroups of ours, one after the other",
        do_reclaim,
        [
            CGROUPS,
            arg("--mib", type=int, required=True),
            arg("--json", action="store_true", help="print the result and its window"),
            *TIGHT,
        ],
    ),
    "cgroup-remove": Command("remove a cgroup of ours", do_cgroup_remove, [CGROUP]),
    "move-pages": Command(
        "move a sample of each process's mergeable pages, one process after the other",
        do_move_pages,
        [
            arg("--pid", type=int, action="append", required=True, help="repeat for several"),
            arg("--pages", type=int, required=True, help="pages to sample (0: all)"),
            arg("--node", type=int, required=True),
            *TIGHT,
        ],
    ),
    "cgroup-create": Command(
        "make a memory cgroup of ours, print its path", do_cgroup_create, [CGROUP]
    ),
    "ksm-restore": Command("restore KSM knobs saved by ksm-apply", do_ksm_restore, [SAVED]),
    "verify": Command(
        "ask dlfill processes to check their pages; print each one's answer",
        do_verify,
        [
            arg("--proc", action="append", required=True, metavar="NAME=PID:OUTFILE"),
            arg("--timeout-s", type=float, default=900),
        ],
    ),
    "hold": Command(
        "hold this machine for a run until stdin closes (exit 3: another run has it)",
        do_hold,
        [arg("--run-id", required=True), arg("--controller", default="?")],
    ),
    "clean": Command(
        "remove what killed runs left here (not the live holder's)",
        do_clean,
        [arg("--holder", help="the run holding the machine, before it starts anything")],
    ),
    "precompile": Command(
        "add this Python's .pyc of every module to the agent's zipapp (before it is used)",
        do_precompile,
        [arg("--archive", required=True)],
    ),
}


def parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="hostagent", description=doc)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c.help)
        for flags, kw in c.args:
            sp.add_argument(*flags, **kw)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd].run(args)
    except AgentError as e:
        print(f"hostagent: {e}", file=sys.stderr)
        return 1
