import pandas as pd

from orchestrator.results.analysis import label_workloads, normalise_latency


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
