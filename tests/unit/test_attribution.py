"""Every walk is attributed to the workload whose page it walked, or to nobody."""

import pandas as pd

from orchestrator.agent.memory import sample_page_addresses
from orchestrator.attribution import (
    UNATTRIBUTED,
    Target,
    Window,
    attribute,
    group_target,
    measured_mappings,
    pattern_mappings,
)

TARGETS = {
    "pattern-0": Target("pattern-0", "host-process", "distinct", 1, 2),
    "fragmented-0": Target("fragmented-0", "host-copy", "one-content", 10000, 256),
}


def test_walks_in_a_window_take_that_workload_and_its_own_vma_count() -> None:
    lat = pd.DataFrame({"ts_ns": [5, 15, 25]})
    attribute(
        lat,
        [Window(0, 10, "pattern-0", "migrate"), Window(10, 20, "fragmented-0", "reclaim")],
        TARGETS,
    )
    assert list(lat.target) == ["pattern-0", "fragmented-0", None]
    assert list(lat.target_kind) == ["host-process", "host-copy", UNATTRIBUTED]
    assert list(lat.pattern) == ["distinct", "one-content", None]
    assert lat.vmas.tolist()[:2] == [1, 10000] and pd.isna(lat.vmas[2])
    assert lat.mappings.tolist()[:2] == [2, 256] and pd.isna(lat.mappings[2])


def test_walks_outside_every_window_never_borrow_a_vma_count() -> None:
    lat = pd.DataFrame({"ts_ns": [100, 200]})
    attribute(lat, [Window(0, 10, "fragmented-0", "reclaim")], TARGETS)
    assert set(lat.target_kind) == {UNATTRIBUTED}
    assert lat.vmas.isna().all() and lat.mappings.isna().all()


def test_damon_walks_inside_a_window_are_not_the_triggers() -> None:
    """kdamond samples pages of any process whenever it likes (Debian's 7.3 runs it):
    its walks fall inside windows by chance and must not take the window's workload."""
    lat = pd.DataFrame(
        {
            "ts_ns": [2, 4, 6, 8],
            "rmap_one": ["try_to_migrate_one", "damon_folio_young_one", None,
                         "damon_folio_mkold_one"],
        }
    )  # fmt: skip
    attribute(lat, [Window(0, 10, "pattern-0", "migrate")], TARGETS)
    assert list(lat.target) == ["pattern-0", None, "pattern-0", None]
    assert list(lat.target_kind) == ["host-process", UNATTRIBUTED, "host-process", UNATTRIBUTED]


def test_a_window_for_an_unknown_target_attributes_nothing() -> None:
    lat = pd.DataFrame({"ts_ns": [5]})
    attribute(lat, [Window(0, 10, "ghost", "migrate")], TARGETS)
    assert lat.target_kind.tolist() == [UNATTRIBUTED]


def test_empty_latency_table_gets_the_columns() -> None:
    lat = attribute(pd.DataFrame({"ts_ns": pd.Series([], dtype="int64")}), [], TARGETS)
    assert {"target", "target_kind", "pattern", "vmas", "mappings"} <= set(lat.columns)


def test_pattern_mappings() -> None:
    assert pattern_mappings("distinct", 12288, 2, 256) == 2
    assert pattern_mappings("distinct", 12288, 300, 256) == 256
    # 20,000 pages of one content: chains of max_page_sharing mappings per KSM page
    assert pattern_mappings("one-content", 20000, 1, 256) == 256
    assert pattern_mappings("one-content", 3, 2, 256) == 6


def test_group_target_takes_the_most_vmas() -> None:
    a = Target("host-dlfill-0", "host-copy", "distinct", 2000, 2)
    b = Target("host-dlfill-1", "host-copy", "distinct", 1999, 2)
    g = group_target("host-dlfill-0+host-dlfill-1", [a, b])
    assert (g.kind, g.vmas, g.mappings) == ("host-copy", 2000, 2)


def test_measured_mappings_from_global_counters() -> None:
    assert measured_mappings(19921, 79) == (19921 + 79) / 79
    assert measured_mappings(10, 0) is None and measured_mappings(None, 5) is None


def test_sampled_page_addresses_spread_over_ranges() -> None:
    ranges = [(0x1000, 0x1000 + 4096 * 10), (0x100000, 0x100000 + 4096 * 10)]
    got = sample_page_addresses(ranges, 4)
    assert len(got) == 4 and got[0] == 0x1000 and got[-1] >= 0x100000
    assert len(sample_page_addresses(ranges, 100)) == 20
