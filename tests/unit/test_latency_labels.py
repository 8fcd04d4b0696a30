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


def test_walks_of_different_functions_are_different_rows() -> None:
    """One page migrated on the old kernel: try_to_migrate_one stops once the page is
    unmapped, remove_migration_pte visits every mapping (about twice the time). Pooled,
    their p50 sits between two modes; each function is its own row, unattributed too."""
    lat = pd.DataFrame(
        {
            "target_kind": ["host-copy", "host-copy", "host-copy", None],
            "pattern": ["distinct"] * 4,
            "vmas": pd.array([10000, 10000, 10000, 10000], dtype="Int64"),
            "mappings": pd.array([3, 3, 3, 3], dtype="Int64"),
            "rmap_one": ["try_to_migrate_one", "remove_migration_pte", None, "try_to_unmap_one"],
        }
    )
    out, wl = label_workloads(normalise_latency(lat))
    row = "host-copy, distinct, 10,000 VMAs, 3 mappings/page"
    assert list(out.workload) == [
        f"{row}, via try_to_migrate_one",
        f"{row}, via remove_migration_pte",
        row,  # a walk whose function was not read
        "unattributed, via try_to_unmap_one",
    ]
    assert list(wl.index) == [row, f"{row}, via remove_migration_pte",
                              f"{row}, via try_to_migrate_one",
                              "unattributed, via try_to_unmap_one"]  # fmt: skip
    assert wl.loc[f"{row}, via try_to_migrate_one", "rmap_one"] == "try_to_migrate_one"
    assert pd.isna(wl.loc[row, "rmap_one"])
