"""What the rmap_walk_ksm collector costs: migration throughput with and without it.

Two processes share a KSM-merged region fragmented into many VMAs of one anon_vma
(the shape where every migrated KSM page costs an rmap_walk_ksm over those VMAs). Each
round migrates every page of theirs (in a lab host: back and forth between the nodes
until the round has lasted --min-round-s) and counts pages migrated per second; rounds go in
pairs, one without and one with the collector, in alternating order (ABBA), so a drift
of the machine hits both sides alike. Prints per-pair figures, the medians and the
with/without ratio.

Where:
  --where lab (default): inside a lab-host VM per kernel (two NUMA cells, NUMA
    migratepages between them), every tracing method the lab host's probe lists, in its
    order (the first is the default a trial uses): the case the kernel A/B runs use.
    ksmd is stopped once the region is merged, so only the migrations are timed.
  --where host: on this host, with its best tracing method; migration by NUMA where the
    host has two nodes, else memory-block offline/online (the kernel may refuse).

    .venv/bin/python bench/collector_overhead.py [--kernel 6.12 --kernel 7.3]
        [--pairs 5] [--mib 32] [--vmas 2000] [--min-round-s 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.agent import fs, ksm, probe, sample
from orchestrator.errors import HostError

LAB_SPEC = """\
name: bench-collector
host: {kind: labvm, memory_mib: 2048, vcpus: 2, numa_cells: 2}
kernels: ["%s"]
"""


Ratios = dict[tuple[str, str], float | None]  # (kernel, method) -> median ratio


@dataclass
class Round:
    traced: bool
    seconds: float
    pages: int
    walks: int  # timed by the collector (0 on untraced rounds)

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0


def run_pairs(
    pairs: int,
    plain: Callable[[int], tuple[float, int]],
    traced: Callable[[int], tuple[float, int, int]],
    first: int = 0,
) -> list[tuple[Round, Round]]:
    """ABBA order: pair i runs plain-then-traced for even i, traced-then-plain for odd.
    Round n gets its index (the migration direction alternates with it)."""
    out = []
    n = 2 * first
    for i in range(first, first + pairs):
        got: dict[bool, Round] = {}
        for with_collector in (False, True) if i % 2 == 0 else (True, False):
            got[with_collector] = (
                Round(True, *traced(n)) if with_collector else Round(False, *plain(n), 0)
            )
            n += 1
        p, t = got[False], got[True]
        out.append((p, t))
        print(
            f"pair {i}: without {p.pages_per_s:9.0f} pages/s ({p.seconds:6.2f} s)   "
            f"with {t.pages_per_s:9.0f} pages/s ({t.seconds:6.2f} s, {t.walks} walks timed)",
            flush=True,
        )
    return out


def run_interleaved(
    pairs: int,
    plain: Callable[[int], tuple[float, int]],
    traced: dict[str, Callable[[int], tuple[float, int, int]]],
    errors: dict[str, str],
) -> dict[str, list[tuple[Round, Round]]]:
    """Pair i of every method before pair i+1 of any, the methods' order rotated each
    time, each pair ABBA by i: a drift of this shared machine (other work on its two
    cores slows the TCG lab host) then hits every method alike, not the first measured.
    A method that fails is dropped with its reason in `errors`."""
    out: dict[str, list[tuple[Round, Round]]] = {m: [] for m in traced}
    for i in range(pairs):
        live = [m for m in traced if m not in errors]
        for method in live[i % len(live) :] + live[: i % len(live)] if live else []:
            try:
                (pair,) = run_pairs(1, plain, traced[method], first=i)
            except (HostError, RuntimeError) as e:  # say it, measure the other methods
                errors[method] = str(e)
                print(f"{method}: no figure: {e}", flush=True)
                continue
            out[method].append(pair)
            print(f"  ^ {method}", flush=True)
    return out


def summarize(label: str, pairs: list[tuple[Round, Round]]) -> float | None:
    """Print a method's figures; returns the median with/without ratio (None: no pair)."""
    good = [(p, t) for p, t in pairs if p.pages and t.pages]
    if not good:
        print(f"{label}: no pair migrated pages on both sides: no figure")
        return None
    ratios = [t.pages_per_s / p.pages_per_s for p, t in good]
    walks = [t.walks / t.seconds for _, t in good]
    plain_rate = statistics.median(p.pages_per_s for p, _ in good)
    traced_rate = statistics.median(t.pages_per_s for _, t in good)
    per_round = statistics.median(r.pages for pair in good for r in pair)
    print(f"\n{label}: {len(good)} pairs, median {per_round:.0f} pages migrated per round")
    print(f"  median pages/s without collector: {plain_rate:.0f}")
    print(f"  median pages/s with collector:    {traced_rate:.0f}")
    print(f"  median walks/s timed (with):      {statistics.median(walks):.0f}")
    print(
        f"  with/without throughput ratio: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return statistics.median(ratios)


# ---------------------------------------------------------------- inside a lab host


class LabShell:
    """The lab host's commands, files and agent, with collectors at paths of our own."""

    def __init__(self, t: Any):
        from orchestrator.hosts.agent import AgentShell

        self.t, self.shell = t, AgentShell(t)

    def run(self, argv: list[str], timeout_s: float = 120) -> str:
        return self.shell.run(argv, timeout_s)

    def agent(self, *args: str, timeout_s: float = 120) -> str:
        return self.shell.agent(*args, timeout_s=timeout_s)

    def read(self, path: str) -> str:
        return self.t.read(path).decode(errors="replace")

    def wait_done(self, path: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while "DLFILL DONE " not in self.read(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path}: no DLFILL DONE line within {timeout_s:.0f} s")
            time.sleep(0.5)

    def start_collector(self, method: str, tag: str, out: str, log: str) -> None:
        from orchestrator.hosts.agent import agent_argv

        pidfile = log.removesuffix(".log") + ".pid"
        self.agent(
            "spawn", "--out", log, "--pidfile", pidfile, "--",
            *agent_argv("trace", "--method", method, "--out", out, "--tag", tag),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "collector: ready" not in self.read(log):
            if time.monotonic() > deadline:
                raise RuntimeError(f"collector did not start: {self.read(log)[-500:]}")
            time.sleep(0.3)

    def stop_collector(self, log: str) -> bool:
        pidfile = log.removesuffix(".log") + ".pid"
        self.agent("stop", "--pidfile", pidfile, "--grace-s", "600", timeout_s=660)
        return "collector: stopped" in self.read(log)


def lab_bench(kernel: str, args: argparse.Namespace, ratios: Ratios) -> bool:
    from orchestrator import fleet, images
    from orchestrator.hosts import agent
    from orchestrator.hosts.labvm import boot_lab_vm
    from orchestrator.runner import pick_domain_type
    from orchestrator.spec import load_spec_text

    spec, _ = load_spec_text(LAB_SPEC % kernel, "bench")
    run_id = f"bench-collector-{int(time.time())}"
    tag = "bench"
    work = agent.WORK
    conn = fleet.connect()
    domain_type = pick_domain_type("auto", {"accel": probe.probe_accel()})
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        stack.callback(conn.close)
        fl = stack.enter_context(fleet.Fleet(conn, run_id, f"bench-{kernel}", domain_type))
        t0 = time.monotonic()
        t = boot_lab_vm(fl, spec, kernel, Path(tmp), run_id, f"bench{kernel}")
        host = LabShell(t)
        release = host.run(["/usr/bin/uname", "-r"]).strip()
        print(f"lab host {kernel} ({release}) ready in {time.monotonic() - t0:.0f} s", flush=True)
        pids = []
        for i in range(2):
            pidfile = f"{work}/frag-{i}.pid"
            pid = host.agent(
                "spawn", "--out", f"{work}/frag-{i}.out", "--pidfile", pidfile, "--",
                "/usr/bin/numactl", "--membind=0", "--",
                *images.fragmented_copy_argv(agent.DLFILL_PATH, args.mib, args.vmas, 7, i),
            )  # fmt: skip
            stack.callback(host.agent, "stop", "--pidfile", pidfile)
            pids.append(int(pid.strip()))
            host.wait_done(f"{work}/frag-{i}.out")
        saved = f"{work}/ksm.json"
        host.agent(
            "ksm-apply", "--saved", saved, "run=1", "pages_to_scan=5000", "sleep_millisecs=10"
        )
        stack.callback(host.agent, "ksm-restore", "--saved", saved)
        want = args.mib * 256  # pages_sharing once every page of copy 1 maps copy 0's
        deadline = time.monotonic() + 300
        while int(host.read("/sys/kernel/mm/ksm/pages_sharing")) < want:
            if time.monotonic() > deadline:
                print(f"{kernel}: KSM did not merge the region within 300 s")
                return False
            time.sleep(1)
        # Stop scanning, keep the merged pages: ksmd's work would blur the timing.
        host.agent("ksm-apply", "--saved", f"{work}/ksm-stop.json", "run=0")

        def pgmigrate() -> int:
            vm = fs.parse_key_values(host.read("/proc/vmstat"))
            return vm["pgmigrate_success"]

        node = [0]  # where the pages are now

        def one_pass() -> tuple[float, int]:
            """Every page of both processes to the other node, timed inside the lab host."""
            src, dst = node[0], 1 - node[0]
            cmds = "; ".join(f"/usr/bin/migratepages {p} {src} {dst}" for p in pids)
            m0 = pgmigrate()
            out = host.run(
                ["/bin/sh", "-c", f"a=$(date +%s%N); {cmds}; b=$(date +%s%N); echo $((b-a))"],
                timeout_s=3600,
            )
            node[0] = dst
            return int(out.strip()) / 1e9, pgmigrate() - m0

        def migrate(_n: int) -> tuple[float, int]:
            # Passes until the round lasts min_round_s: one pass on the new kernel takes
            # ~0.3 s, too short to time against the agent's own noise.
            seconds, pages = 0.0, 0
            while seconds < args.min_round_s:
                s, p = one_pass()
                seconds, pages = seconds + s, pages + p
            return seconds, pages

        def traced_with(method: str) -> Callable[[int], tuple[float, int, int]]:
            def traced(n: int) -> tuple[float, int, int]:
                out, log = f"{work}/lat-{method}-{n}.jsonl", f"{work}/col-{method}-{n}.log"
                host.start_collector(method, tag, out, log)
                try:
                    seconds, pages = migrate(n)
                finally:
                    # The collector drains its buffer before it removes its probes.
                    clean = host.stop_collector(log)
                if not clean:
                    raise RuntimeError(f"collector did not stop cleanly: {host.read(log)[-500:]}")
                # Counted in the lab host: reading the file out costs more than the rounds.
                walks = int(host.run(["/usr/bin/wc", "-l", out]).split()[0])
                host.run(["/bin/rm", "-f", out, log])
                return seconds, pages, walks

            return traced

        methods = lab_methods(host, args.method)
        print(f"{kernel}: methods, cheapest exact first: {', '.join(methods)}", flush=True)
        errors: dict[str, str] = {}
        results = run_interleaved(args.pairs, migrate, {m: traced_with(m) for m in methods}, errors)
        for method in methods:
            label = f"kernel {kernel} ({release}), {method} collector, {args.vmas} VMAs"
            ratios[(kernel, method)] = summarize(label, results[method])
        return all(r is not None for r in ratios.values())


def lab_methods(host: Any, wanted: list[str] | None) -> list[str]:
    """The lab host's tracing methods in the probe's order (its default first)."""
    probed = json.loads(host.agent("probe", timeout_s=300))["tracing"]
    print(f"probe: {probed['how']}", flush=True)
    methods = list(probed["value"])
    return [m for m in methods if m in wanted] if wanted else methods


# ---------------------------------------------------------------- on this host


def host_bench(args: argparse.Namespace) -> bool:
    from orchestrator import triggers
    from orchestrator.sampling import Collector
    from orchestrator.spec import HostWorkload, Migrate

    facts = probe.probe_host(check_bpf=True)
    methods = facts["tracing"]["value"]
    if not methods:
        print("no tracing method on this host: nothing to measure")
        return False
    method, nodes = methods[0], int(facts["numa"]["value"])
    how: Literal["numa", "offline"] = "numa" if nodes >= 2 else "offline"
    run_id = f"bench-collector-{int(time.time())}"
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        saved = fs.STATE_DIR / f"ksm-{run_id}.json"
        ksm.apply_ksm({"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1}, saved)
        stack.callback(ksm.restore_ksm, saved)
        procs = triggers.start_host_workload(
            HostWorkload(copies=2, mib=args.mib), args.vmas, 7, run_id, stack, Path(tmp)
        )
        pids = {f"host-dlfill-{i}": p.pid for i, p in enumerate(procs)}
        deadline = time.monotonic() + 120
        while ksm.read_ksm_counters()["pages_sharing"] < args.mib * 256:
            if time.monotonic() > deadline:
                print("KSM did not merge the workload within 120 s")
                return False
            time.sleep(0.5)

        def migrate(n: int) -> tuple[float, int]:
            m0, t0 = sample.read_vmstat()["pgmigrate_success"], time.monotonic()
            triggers.migrate_once(
                Migrate(enabled=True, method=how), nodes, pids, n, lambda e, d: None, run_id
            )
            return time.monotonic() - t0, sample.read_vmstat()["pgmigrate_success"] - m0

        def traced(n: int) -> tuple[float, int, int]:
            with Collector(Path(tmp) / f"lat{n}.jsonl", method, run_id.replace("-", "_")) as c:
                seconds, pages = migrate(n)
            return seconds, pages, len(c.samples())

        results = run_pairs(args.pairs, migrate, traced)
        label = f"this host, {method} collector, {how} migration, {args.vmas} VMAs"
        return summarize(label, results) is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--where", choices=["lab", "host"], default="lab")
    ap.add_argument("--kernel", action="append", help="lab kernel label (default: all built)")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--vmas", type=int, default=2000)
    ap.add_argument("--min-round-s", type=float, default=3.0, help="lab: repeat passes per round")
    ap.add_argument(
        "--method", action="append", help="lab: only these tracing methods (default: all probed)"
    )
    args = ap.parse_args()
    if args.where == "lab":
        from orchestrator import labimage

        kernels = args.kernel or [k.label for k in labimage.find_lab_image().kernels]
        ratios: Ratios = {}
        ok = [lab_bench(k, args, ratios) for k in kernels]
        print_table(ratios)
        return 0 if all(ok) else 1
    return 0 if host_bench(args) else 1


def print_table(ratios: Ratios) -> None:
    """Each kernel's methods in probe order (the first is the default), one line each."""
    print("\nwith/without migration throughput, median of pairs (first method: the default)")
    for (kernel, method), r in ratios.items():
        print(f"  {kernel:8} {method:18} {'no figure' if r is None else f'{r:.3f}'}")


if __name__ == "__main__":
    sys.exit(main())
