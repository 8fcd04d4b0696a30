import pandas as pd

from orchestrator.analysis import with_vmas_in_trigger


def test_few_vma_counts_split_the_trigger() -> None:
    lat = pd.DataFrame({"trigger": ["migrate", "migrate", "reclaim"], "vmas": [1, 2000, None]})
    out = with_vmas_in_trigger(lat)
    assert list(out.trigger) == ["migrate @1 VMAs", "migrate @2000 VMAs", "reclaim @? VMAs"]


def test_continuous_vma_counts_are_left_to_the_binned_table() -> None:
    lat = pd.DataFrame({"trigger": ["migrate"] * 20, "vmas": range(20)})
    assert list(with_vmas_in_trigger(lat).trigger) == ["migrate"] * 20
