import pandas as pd

from orchestrator.analysis import label_workloads, normalise_latency
from orchestrator.labrun import attribute_windows


def test_unattributed_walks_never_take_a_vma_count() -> None:
    """A run from before attribution: `vmas` was the phase maximum, so a walk without a
    target stands as unattributed, not under that count; a named target keeps its own."""
    lat = pd.DataFrame(
        {
            "trigger": ["reclaim", "reclaim", "migrate"],
            "vmas": [10000, 10000, 2000],
            "target": [None, "pattern-0", "fragmented-0"],
        }
    )
    out, wl = label_workloads(normalise_latency(lat))
    assert list(out.target_kind) == ["unattributed", "host-process", "host-copy"]
    assert list(out.workload) == [
        "unattributed",
        "host-process, 10,000 VMAs",
        "host-copy, 2,000 VMAs",
    ]
    assert pd.isna(wl.loc["unattributed", "vmas"])


def test_near_equal_counts_are_one_row_so_kernels_pair() -> None:
    lat = pd.DataFrame(
        {
            "target_kind": ["host-copy"] * 3 + ["guest"],
            "pattern": ["distinct"] * 4,
            "vmas": pd.array([10000, 10003, 2000, 1], dtype="Int64"),
            "mappings": pd.array([2, 2, 2, 2], dtype="Int64"),
        }
    )
    out, wl = label_workloads(normalise_latency(lat))
    assert out.workload[0] == out.workload[1] == "host-copy, distinct, 10,000 VMAs, 2 mappings/page"
    assert list(wl.index) == [  # kinds in contract order, then VMAs
        "guest, distinct, 1 VMA, 2 mappings/page",
        "host-copy, distinct, 2,000 VMAs, 2 mappings/page",
        "host-copy, distinct, 10,000 VMAs, 2 mappings/page",
    ]


def test_walks_in_a_migration_window_take_that_process() -> None:
    lat = pd.DataFrame({"ts_ns": [5, 15, 25], "vmas": pd.array([9, 9, 9], dtype="Int64")})
    procs = pd.DataFrame({"guest": ["pattern-0", "fragmented-0"], "ram_vmas": [1, 2000]})
    attribute_windows(lat, [(0, 10, "pattern-0"), (10, 20, "fragmented-0")], procs)
    assert list(lat.target) == ["pattern-0", "fragmented-0", None]
    assert list(lat.vmas) == [1, 2000, 9]
