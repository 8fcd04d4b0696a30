"""Trace parsing and latency pairing, against trace text recorded on a real host."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.agent import trace
from orchestrator.triggers import pick_latency

DATA = Path(__file__).resolve().parents[1] / "data" / "trace"


def recorded_events() -> list[dict]:
    lines = (DATA / "set_migration_pte.txt").read_text().splitlines()
    events = [trace.parse_trace_line(line) for line in lines]
    assert all(e is not None for e in events), "every recorded line parses"
    return events  # type: ignore[return-value]


def test_parse_recorded_line() -> None:
    ev = recorded_events()[0]
    assert ev["event"] == "set_migration_pte"
    assert ev["comm"] == "<...>" and ev["pid"] == 30464 and ev["cpu"] == 1
    assert ev["ts_ns"] == 2386_888104_000
    assert ev["fields"] == {"addr": "55cea4e0b000", "pte": "f7ffe7ffda741e00", "order": "0"}


def test_proxy_groups_consecutive_ptes_of_one_entry() -> None:
    events = recorded_events()
    g = trace.ProxyGrouper()
    samples = [s for ev in events if (s := g.feed(ev))] + g.flush()
    # Independent count: runs of equal (cpu, pid, pte) of length >= 2 in file order.
    runs, last, n = [], None, 0
    for ev in events:
        key = (ev["cpu"], ev["pid"], ev["fields"]["pte"])
        if key == last:
            n += 1
        else:
            if n >= 2:
                runs.append(n)
            last, n = key, 1
    if n >= 2:
        runs.append(n)
    assert len(samples) == len(runs) > 0
    assert sorted(s["mappings"] for s in samples) == sorted(runs)
    assert all(s["lower_bound"] and s["method"] == "tracepoint-proxy" for s in samples)
    assert all(s["duration_ns"] >= 0 for s in samples)


def test_proxy_span_is_first_to_last_event() -> None:
    mk = "  kcompactd0-40 [000] .... {ts}: set_migration_pte: addr=1000, pte={pte} order=0"
    g = trace.ProxyGrouper()
    out = [
        g.feed(trace.parse_trace_line(mk.format(ts=t, pte=p)))  # type: ignore[arg-type]
        for t, p in (
            ("10.000001", "aa"),
            ("10.000004", "aa"),
            ("10.000009", "aa"),
            ("10.000020", "bb"),
        )
    ]
    assert out[:3] == [None, None, None]
    assert out[3] is not None and out[3]["duration_ns"] == 8000 and out[3]["mappings"] == 3


def test_kprobe_pairs_entry_and_return_per_pid() -> None:
    lines = [
        "  kcompactd0-40 [001] ..... 100.000010: rwk: (rmap_walk_ksm+0x0/0x1e0) "
        "rmap_one=try_to_migrate_one+0x0/0x2a0",
        "  bash-77 [000] ..... 100.000020: rwk: (rmap_walk_ksm+0x0/0x1e0)",
        "  kcompactd0-40 [001] ..... 100.000510: rwkr: (rmap_walk+0x2c/0x40 <- rmap_walk_ksm)",
        "  bash-77 [000] ..... 100.001020: rwkr: (rmap_walk+0x2c/0x40 <- rmap_walk_ksm)",
    ]
    p = trace.KprobePairer("rwk", "rwkr")
    out = [p.feed(trace.parse_trace_line(line)) for line in lines]  # type: ignore[arg-type]
    assert out[0] is None and out[1] is None
    assert out[2] == {
        "ts_ns": 100_000010_000,
        "duration_ns": 500_000,
        "method": "kprobe",
        "lower_bound": False,
        "pid": 40,
        "comm": "kcompactd0",
        "caller": "rmap_walk",
        "rmap_one": "try_to_migrate_one",
    }
    assert out[3] is not None and out[3]["duration_ns"] == 1_000_000
    assert out[3]["rmap_one"] is None  # a probe defined without BTF fetches nothing


def test_the_entry_probe_fetches_rmap_one_where_btf_gave_its_offset() -> None:
    entry, ret = trace.kprobe_definitions("densitylab_t", 16)
    assert entry == "p:densitylab_t/rwk rmap_walk_ksm rmap_one=+16(%si):symbol"
    assert ret == "r:densitylab_t/rwkr rmap_walk_ksm"
    assert trace.kprobe_definitions("g")[0] == "p:g/rwk rmap_walk_ksm"


def test_latency_method_choice() -> None:
    plan = pick_latency("auto", ["tracepoint-proxy"], ["migrate", "reclaim"])
    assert plan.method == "tracepoint-proxy"
    assert plan.covers("migrate") and not plan.covers("reclaim")
    assert "migration only" in plan.notes["reclaim"]
    assert pick_latency("auto", ["kprobe", "tracepoint-proxy"], ["reclaim"]).method == "kprobe"
    assert pick_latency("none", ["kprobe"], ["migrate"]).method is None
    assert pick_latency("auto", [], ["migrate"]).method is None


def test_stop_disables_events_before_the_drain(tmp_path: Path) -> None:
    """The first stop answer turns the instance's events off, so the drain reads only
    what is buffered. Run against a directory laid out like tracefs."""
    inst_root = tmp_path / "instances"
    inst_root.mkdir()
    enable = tmp_path / "instances" / "densitylab-t" / "events" / "migrate" / "x" / "enable"
    with trace.TraceInstance(tmp_path, "densitylab-t") as inst:
        enable.parent.mkdir(parents=True)
        inst.enable("migrate/x")
        stop = [False]
        check = trace.quiet_on_stop(inst, lambda: stop[0])
        assert not check() and enable.read_text() == "1"
        stop[0] = True
        assert check() and enable.read_text() == "0"
        enable.write_text("1")  # only the first stop answer disables
        assert check() and enable.read_text() == "1"
        enable.write_text("0")
        for p in sorted(inst.dir.rglob("*"), reverse=True):  # rmdir needs it empty here
            p.unlink() if p.is_file() else p.rmdir()
    assert not (inst_root / "densitylab-t").exists()


def test_the_trace_stream_is_spooled_then_parsed(tmp_path: Path) -> None:
    """Run against a real FIFO standing in for trace_pipe (non-blocking reads, EAGAIN
    while empty): lines written while collecting come out as paired samples only after
    the stop, and the spool is gone."""
    import os
    import threading

    pipe = tmp_path / "trace_pipe"
    os.mkfifo(pipe)
    lines = [
        "  migratepages-41 [001] ..... 100.000010: rwk: (rmap_walk_ksm+0x0/0x1e0)",
        "  migratepages-41 [001] ..... 100.000510: rwkr: (rmap_walk+0x2c/0x40 <- rmap_walk_ksm)",
    ]
    done = threading.Event()

    def writer() -> None:
        with open(pipe, "w") as w:
            for _ in range(3):
                w.write("\n".join(lines) + "\n")
                w.flush()
        done.set()

    spool, out = tmp_path / "lat.jsonl.trace", tmp_path / "lat.jsonl"
    t = threading.Thread(target=writer)
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer open the FIFO
    t.start()
    with open(out, "a") as f:
        trace.stream_trace(pipe, trace.KprobePairer("rwk", "rwkr"), f, done.is_set, spool)
    os.close(fd)
    t.join()
    samples = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [s["duration_ns"] for s in samples] == [500_000] * 3
    assert {s["pid"] for s in samples} == {41} and not spool.exists()
