"""What KSM should save for a fill pattern: the prediction every trial is held to."""

from __future__ import annotations

import math

from orchestrator.workload import FillResult


def merged_saving(copies: int, max_page_sharing: int) -> int:
    """Pages saved when `copies` identical pages merge: KSM keeps one page per
    max_page_sharing sharers (a chain of duplicates beyond that)."""
    return copies - math.ceil(copies / max_page_sharing) if copies > 1 else 0


def pattern_saving(pattern: str, dup_pages: int, copies: int, max_page_sharing: int) -> int:
    """Pages saved on `copies` processes of `dup_pages` duplicate pages each: distinct
    pages merge index by index across the copies; one-content pages all merge together
    (within a process too), in chains of max_page_sharing."""
    if pattern == "one-content":
        return merged_saving(dup_pages * copies, max_page_sharing)
    return dup_pages * merged_saving(copies, max_page_sharing)


def predicted_saving_pages(
    fills: list[FillResult],
    use_zero_pages: bool,
    max_page_sharing: int = 256,
    pattern: str = "distinct",
) -> int:
    """Pages KSM should save for this pattern across the fleet.

    Duplicate page i is identical in every guest and distinct from the guest's other
    pages, so each index merges its N copies (or, one-content, every duplicate page
    merges with every other). Zero pages all merge together (or, with use_zero_pages,
    each maps the zero page). Unique and volatile pages never merge.
    """
    if not fills:
        return 0
    dup = pattern_saving(pattern, min(f.dup_pages for f in fills), len(fills), max_page_sharing)
    zero = sum(f.zero_pages for f in fills)
    return dup + (zero if use_zero_pages else merged_saving(zero, max_page_sharing))
