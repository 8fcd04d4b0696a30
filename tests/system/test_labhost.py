"""Lab-host VMs: each kernel under test boots the lab image under TCG with two NUMA
nodes, cgroup v2 memcg and working kprobes on rmap_walk_ksm; KSM pages migrated between
the nodes give real rmap_walk_ksm entry/return samples.

Plain qemu-system-x86_64 (no libvirt): TCG, 2 vCPUs, 4 GiB in two NUMA cells, a qcow2
overlay per boot, direct kernel boot, qemu-ga on a unix socket. The image comes from
`make lab-images` (a cache hit here takes ~2 s; a build ~1-2 min with network access).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import agentship, kernels, labimage
from orchestrator.errors import HostError
from orchestrator.images import build_dlfill
from orchestrator.proc import run, stop_group
from tests.labboot import boot_until_ready
from tests.qga import Agent

pytestmark = [pytest.mark.system, pytest.mark.slow]

READY_TIMEOUT_S = 120.0
MERGE_TIMEOUT_S = 180.0
# Two dlfill instances with one seed: their dup pages merge pairwise across the two
# processes (never within one). --fragment splits each region into 2000 VMAs sharing one
# anon_vma: the shape where the old rmap_walk_ksm walks the whole interval tree.
DLFILL_MIB = 16
DLFILL_PAGES = DLFILL_MIB * 256
FRAGMENT_VMAS = 2000


@dataclass
class Boot:
    kernel: labimage.LabKernel
    console: Path
    agent: Agent
    ready_s: float


@pytest.fixture(scope="module")
def image() -> labimage.LabImage:
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    try:
        return labimage.build_lab_image()
    except HostError as e:
        pytest.skip(f"host cannot build the lab image: {e}")


@pytest.fixture(scope="module")
def dlfill(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: cannot build dlfill")
    return build_dlfill(tmp_path_factory.mktemp("dlfill")).read_bytes()


@pytest.fixture(scope="module", params=labimage.DEFAULT_KERNELS)
def booted(
    request: pytest.FixtureRequest,
    image: labimage.LabImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Boot]:
    """One lab host per kernel (shared by that kernel's tests); always killed, overlay
    always deleted."""
    kernel = image.kernel(request.param)
    tmp = tmp_path_factory.mktemp(f"labhost-{kernel.label}")
    console, overlay = tmp / "console.log", tmp / "overlay.qcow2"
    plan = labimage.BootPlan(image, kernel, overlay, tmp / "qga.sock")
    try:
        qemu, ready_s = boot_until_ready(plan, console, READY_TIMEOUT_S)
        try:
            agent = Agent(plan.agent_socket)
            try:
                agent.sync()
                print(f"\nLABHOST {kernel.label} {kernel.release}: ready in {ready_s:.1f} s")
                yield Boot(kernel, console, agent, ready_s)
            finally:
                agent.close()
        finally:
            stop_group(qemu)
    finally:
        overlay.unlink(missing_ok=True)


def test_boots_the_kernel_with_two_nodes_memcg_and_tracefs(booted: Boot) -> None:
    a = booted.agent
    assert "DENSITYLAB: boot ok" in booted.console.read_text(errors="replace")
    assert a.ok("uname -r").strip() == booted.kernel.release
    nodes = a.ok("ls /sys/devices/system/node").split()
    assert {"node0", "node1"} <= set(nodes), nodes
    assert "memory" in a.ok("cat /sys/fs/cgroup/cgroup.controllers").split()
    assert "memory" in a.ok("cat /sys/fs/cgroup/cgroup.subtree_control").split()
    assert a.ok("cat /sys/kernel/security/lockdown 2>/dev/null || echo none").find("[none]") >= 0
    assert a.ok("test -b /dev/zram0 && echo zram").strip() == "zram"
    assert a.ok("cat /sys/kernel/mm/ksm/run").strip() in ("0", "1")


def test_kprobes_on_rmap_walk_ksm_can_be_added_and_removed(booted: Boot) -> None:
    a = booted.agent
    a.ok("grep -qw rmap_walk_ksm /sys/kernel/tracing/available_filter_functions")
    a.ok(
        "cd /sys/kernel/tracing && echo 'p:dlt/rwk rmap_walk_ksm' >> kprobe_events"
        " && echo 'r:dlt/rwkr rmap_walk_ksm' >> kprobe_events"
    )
    try:
        events = a.ok("cat /sys/kernel/tracing/kprobe_events")
        assert "p:dlt/rwk rmap_walk_ksm" in events, events
        assert re.search(r"^r\d*:dlt/rwkr rmap_walk_ksm$", events, flags=re.M), events
        assert a.ok("ls /sys/kernel/tracing/events/dlt").split() == ["enable", "filter", "rwk",
                                                                      "rwkr"]  # fmt: skip
    finally:
        a.ok(
            "cd /sys/kernel/tracing && echo '-:dlt/rwk' >> kprobe_events"
            " && echo '-:dlt/rwkr' >> kprobe_events"
        )
    assert "dlt/" not in a.ok("cat /sys/kernel/tracing/kprobe_events")


def test_host_agent_runs_inside_when_pushed(booted: Boot) -> None:
    """The agent is not baked into the image: it is pushed per boot and runs on python3."""
    a = booted.agent
    a.ok("mkdir -p /opt/densitylab")
    a.push(agentship.agent_zipapp().read_bytes(), agentship.REMOTE_AGENT_PATH)
    python = a.ok("python3 --version").strip()
    probe = json.loads(a.ok(f"python3 {agentship.REMOTE_AGENT_PATH} probe --no-bpf", 120))
    print(f"LABHOST {booted.kernel.label} {python}: agent.pyz probe keys {sorted(probe)}")
    assert probe["kernel_release"]["value"] == a.ok("uname -r").strip()
    assert probe["ksm"]["value"] is True and probe["cgroup"]["value"] == "v2"
    assert "kprobe" in probe["tracing"]["value"]


# ---------------------------------------------------------------- real rmap_walk_ksm samples

TRACE_RE = re.compile(
    r"^\s*(?P<task>.+)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+): (?P<ev>rwkr?):"
)


def walk_durations_us(trace: str) -> tuple[int, int, list[float]]:
    """(entries, returns, durations in µs of entry/return pairs matched per pid)."""
    entries = returns = 0
    open_at: dict[str, float] = {}
    durations = []
    for line in trace.splitlines():
        if not (m := TRACE_RE.match(line)):
            continue
        ts = float(m["ts"])
        if m["ev"] == "rwk":
            entries += 1
            open_at[m["pid"]] = ts
        else:
            returns += 1
            if (t0 := open_at.pop(m["pid"], None)) is not None:
                durations.append((ts - t0) * 1e6)
    return entries, returns, durations


KSM_SETUP = """
cd /sys/kernel/mm/ksm
echo 2000 > pages_to_scan; echo 10 > sleep_millisecs; echo 1 > run
for i in 1 2; do
  numactl --membind=0 --cpunodebind=0 /usr/local/bin/dlfill --mib {mib} --dup 1 \
    --mergeable --fragment {vmas} --seed 7 --instance $i --hold > /tmp/dlfill$i.out 2>&1 &
  echo $! > /tmp/dlfill$i.pid
done
"""

TRACE_ON = """
cd /sys/kernel/tracing
echo 'p:dl/rwk rmap_walk_ksm' >> kprobe_events
echo 'r:dl/rwkr rmap_walk_ksm' >> kprobe_events
echo 16384 > buffer_size_kb
echo > trace
echo 1 > events/dl/enable
"""

TRACE_OFF = """
cd /sys/kernel/tracing
echo 0 > events/dl/enable
cat trace > /tmp/rwk.trace
echo '-:dl/rwk' >> kprobe_events; echo '-:dl/rwkr' >> kprobe_events
echo > trace
"""


def node_pages(a: Agent, pid: str) -> dict[str, int]:
    """Pages of a process per NUMA node ("N0", "N1"), summed over /proc/PID/numa_maps."""
    counts: Counter[str] = Counter()
    for node, pages in re.findall(r"\b(N\d+)=(\d+)", a.ok(f"cat /proc/{pid}/numa_maps")):
        counts[node] += int(pages)
    return dict(counts)


def ksm_counter(a: Agent, name: str) -> int:
    return int(a.ok(f"cat /sys/kernel/mm/ksm/{name}"))


def wait_merged(a: Agent, want_sharing: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ksm_counter(a, "pages_sharing") >= want_sharing:
            return time.monotonic() - t0
        time.sleep(1.0)
    pytest.fail(
        f"pages_sharing {ksm_counter(a, 'pages_sharing')} < {want_sharing} after {timeout_s} s"
    )


def test_migrating_ksm_pages_gives_rmap_walk_ksm_samples(booted: Boot, dlfill: bytes) -> None:
    a = booted.agent
    a.push(dlfill, "/usr/local/bin/dlfill", 0o755)
    a.ok(KSM_SETUP.format(mib=DLFILL_MIB, vmas=FRAGMENT_VMAS))
    try:
        for i in (1, 2):
            deadline = time.monotonic() + 120
            while "DLFILL DONE" not in a.ok(f"cat /tmp/dlfill{i}.out"):
                assert time.monotonic() < deadline, a.ok(f"cat /tmp/dlfill{i}.out")
                time.sleep(0.5)
        merge_s = wait_merged(a, int(DLFILL_PAGES * 0.9), MERGE_TIMEOUT_S)
        pid = a.ok("cat /tmp/dlfill1.pid").strip()
        vmas = int(a.ok(f"wc -l < /proc/{pid}/maps"))
        sharing = ksm_counter(a, "pages_sharing")
        before = node_pages(a, pid)
        a.ok(TRACE_ON)
        try:
            t0 = time.monotonic()
            a.ok(f"migratepages {pid} 0 1", timeout_s=600)
            migrate_s = time.monotonic() - t0
        finally:
            a.ok(TRACE_OFF)
        after = node_pages(a, pid)
        rc, trace, err = a.exec_sh("cat /tmp/rwk.trace", 120)
        assert rc == 0, err
    finally:
        a.exec_sh("kill $(cat /tmp/dlfill1.pid /tmp/dlfill2.pid) 2>/dev/null; echo 2 > "
                  "/sys/kernel/mm/ksm/run")  # fmt: skip
    entries, returns, durations = walk_durations_us(trace)
    lost = "LOST" in trace or "[LOST" in trace
    summary = {
        "kernel": booted.kernel.release,
        "ready_s": round(booted.ready_s, 1),
        "merge_s": round(merge_s, 1),
        "pages_sharing": sharing,
        "maps_lines": vmas,
        "migrate_s": round(migrate_s, 2),
        "node_pages_before": before,
        "node_pages_after": after,
        "rwk": entries,
        "rwkr": returns,
        "pairs": len(durations),
        "lost_events": lost,
    }
    if durations:
        q = statistics.quantiles(durations, n=100)
        summary |= {
            "walk_us_median": round(statistics.median(durations), 1),
            "walk_us_p99": round(q[98], 1),
            "walk_us_max": round(max(durations), 1),
            "walk_ms_total": round(sum(durations) / 1e3, 1),
        }
    print(f"LABHOST {booted.kernel.label} rmap_walk_ksm: {json.dumps(summary)}")
    assert entries > 0 and returns > 0, trace[-2000:]
    assert after.get("N1", 0) > before.get("N1", 0), (before, after)
    assert len(durations) >= min(entries, returns) * 0.9


def agent_sh(args: str) -> str:
    return f"python3 {agentship.REMOTE_AGENT_PATH} {args}"


def test_bpf_fentry_collector_times_every_walk_of_a_migration(booted: Boot, dlfill: bytes) -> None:
    """The agent's own BPF collector (no bpftrace in the image) inside the lab host:
    the probe puts it first, and a migration's walks come out with time and pid."""
    a = booted.agent
    a.ok("mkdir -p /opt/densitylab")
    a.push(agentship.agent_zipapp().read_bytes(), agentship.REMOTE_AGENT_PATH)
    a.push(dlfill, "/usr/local/bin/dlfill", 0o755)
    tracing = json.loads(a.ok(agent_sh("probe"), 300))["tracing"]
    print(f"LABHOST {booted.kernel.label} tracing methods {tracing['value']}: {tracing['how']}")
    assert tracing["value"][0] == "bpf-fentry", tracing
    a.ok(KSM_SETUP.format(mib=DLFILL_MIB, vmas=FRAGMENT_VMAS))
    try:
        for i in (1, 2):
            deadline = time.monotonic() + 120
            while "DLFILL DONE" not in a.ok(f"cat /tmp/dlfill{i}.out"):
                assert time.monotonic() < deadline, a.ok(f"cat /tmp/dlfill{i}.out")
                time.sleep(0.5)
        wait_merged(a, int(DLFILL_PAGES * 0.9), MERGE_TIMEOUT_S)
        a.ok("echo 0 > /sys/kernel/mm/ksm/run")  # only the migration walks from here
        pid = a.ok("cat /tmp/dlfill1.pid").strip()
        a.ok(agent_sh("spawn --out /tmp/col.log --pidfile /tmp/col.pid -- /usr/bin/python3 "
                      f"{agentship.REMOTE_AGENT_PATH} trace --method bpf-fentry "
                      "--out /tmp/lat.jsonl --tag t"))  # fmt: skip
        deadline = time.monotonic() + 120
        while "collector: ready" not in a.ok("cat /tmp/col.log"):
            assert time.monotonic() < deadline, a.ok("cat /tmp/col.log")
            time.sleep(0.5)
        t0 = int(a.ok(agent_sh("now")))
        a.ok(f"migratepages {pid} 0 1", timeout_s=600)
        t1 = int(a.ok(agent_sh("now")))
        a.ok(agent_sh("stop --pidfile /tmp/col.pid --grace-s 120"), timeout_s=180)
        log = a.ok("cat /tmp/col.log")
        walks = [json.loads(ln) for ln in a.ok("cat /tmp/lat.jsonl").splitlines()]
    finally:
        a.exec_sh("kill $(cat /tmp/dlfill1.pid /tmp/dlfill2.pid) 2>/dev/null; echo 2 > "
                  "/sys/kernel/mm/ksm/run")  # fmt: skip
    assert "collector: stopped" in log, log
    inside = [w for w in walks if t0 <= w["ts_ns"] <= t1 and w["comm"] == "migratepages"]
    durations = sorted(w["duration_ns"] / 1e3 for w in inside)
    summary = {"walks": len(walks), "migratepages_walks": len(inside)}
    if durations:
        summary |= {"p50_us": round(statistics.median(durations), 1), "max_us": durations[-1]}
    print(f"LABHOST {booted.kernel.label} bpf-fentry: {json.dumps(summary)}")
    # Two copies, each KSM page mapped by both: walks for at least half the pages.
    assert len(inside) >= DLFILL_PAGES * 0.5, summary
    assert all(w["method"] == "bpf-fentry" and w["duration_ns"] > 0 for w in walks)
    # Each page moved is walked twice: unmapped to migration entries, then remapped.
    walk_funcs = {w["rmap_one"] for w in inside}
    assert walk_funcs == {"try_to_migrate_one", "remove_migration_pte"}, walk_funcs


# ---------------------------------------------------------------- kernels on their own


def test_debian_vmlinuz_header_names_its_release(image: labimage.LabImage) -> None:
    """bzimage_release (used for local kernels) agrees with Debian's package names."""
    for k in image.kernels:
        spec = kernels.parse_kernel_spec(f"file:{k.vmlinuz},initrd={k.initrd}")
        local = kernels.local_kernel(spec)
        assert local.release == k.release and local.label == k.label
        assert local.config_sha256 is None and local.initrd == k.initrd.resolve()


def test_private_apt_reads_nothing_from_etc_apt(image: labimage.LabImage) -> None:
    apt = kernels.private_apt()
    apt.ensure()
    dump = run(["apt-config", "dump"], env=apt.env(), timeout_s=30).stdout
    dirs = dict(re.findall(r'^(Dir::Etc(?:::\w+)?|Dir::State(?:::\w+)?|Dir::Cache) "(.*)";$',
                           dump, flags=re.M))  # fmt: skip
    assert dirs["Dir::Etc::parts"].startswith(str(apt.root))
    assert dirs["Dir::Etc::sourceparts"].startswith(str(apt.root))
    assert dirs["Dir::State::status"].startswith(str(apt.root))
    assert all(not v.startswith("/etc/apt") for v in dirs.values()), dirs
