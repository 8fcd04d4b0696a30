from orchestrator.engine.predict import predicted_saving_pages
from orchestrator.sampling import settled
from orchestrator.workload import FillResult


def test_settled_needs_enough_scans_between_samples() -> None:
    assert not settled([(10, 1000)], scans=2, pct=1)
    assert not settled([(10, 1000), (11, 1000)], scans=2, pct=1)
    assert settled([(10, 1000), (11, 1000), (12, 1005)], scans=2, pct=1)


def test_settled_works_when_many_scans_fit_between_samples() -> None:
    # ksmd can finish ~18 full scans between two 1 s samples on a small fleet.
    assert settled([(100, 5000), (118, 5010)], scans=10, pct=1)
    assert not settled([(100, 4000), (118, 5000)], scans=10, pct=1)


def test_settled_compares_with_the_newest_old_enough_sample() -> None:
    seen = [(0, 0), (5, 900), (12, 1000), (13, 1000)]
    assert not settled(seen, scans=10, pct=1)  # 13-10=3: compares with (0, 0)
    assert settled([*seen, (22, 1001)], scans=10, pct=1)  # compares with (12, 1000)


def fill(guest: str, dup: int, zero: int) -> FillResult:
    return FillResult(guest, 1.0, dup, zero, 10, 0, 1)


def test_prediction_for_dup_and_zero_pages() -> None:
    fills = [fill(f"g{i}", 100, 20) for i in range(4)]
    assert predicted_saving_pages(fills, use_zero_pages=False) == 300 + 79
    # 80 zero pages with at most 16 sharers per KSM page: 5 pages stay.
    assert predicted_saving_pages(fills, use_zero_pages=False, max_page_sharing=16) == 300 + 75
    assert predicted_saving_pages(fills, use_zero_pages=True) == 300 + 80
    assert predicted_saving_pages(fills[:1], use_zero_pages=False) == 19
    assert predicted_saving_pages([], use_zero_pages=False) == 0
