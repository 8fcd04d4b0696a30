import pandas as pd

from orchestrator.analysis import with_vmas_in_trigger
from orchestrator.labrun import attribute_windows


def test_few_vma_counts_split_the_trigger() -> None:
    lat = pd.DataFrame({"trigger": ["migrate", "migrate", "reclaim"], "vmas": [1, 2000, None]})
    out = with_vmas_in_trigger(lat)
    assert list(out.trigger) == ["migrate @1 VMAs", "migrate @2000 VMAs", "reclaim @? VMAs"]


def test_continuous_vma_counts_are_left_to_the_binned_table() -> None:
    lat = pd.DataFrame({"trigger": ["migrate"] * 20, "vmas": range(20)})
    assert list(with_vmas_in_trigger(lat).trigger) == ["migrate"] * 20


def test_walks_in_a_migration_window_take_that_process() -> None:
    lat = pd.DataFrame({"ts_ns": [5, 15, 25], "vmas": pd.array([9, 9, 9], dtype="Int64")})
    procs = pd.DataFrame({"guest": ["pattern-0", "fragmented-0"], "ram_vmas": [1, 2000]})
    attribute_windows(lat, [(0, 10, "pattern-0"), (10, 20, "fragmented-0")], procs)
    assert list(lat.target) == ["pattern-0", "fragmented-0", None]
    assert list(lat.vmas) == [1, 2000, 9]
