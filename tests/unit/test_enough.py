"""The stopping rule: the median's interval, the watch over the collector's raw file,
and batched move_pages stopping once tight (real move_pages of this process's pages)."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agent import enough
from tests.unit.test_agent_bpf import slot

MIGRATE, REMOVE = 0xFFFF0010, 0xFFFF0020


def walks(n: int, func: int, tgid: int, dur_ns: int = 10_000, jitter: float = 0.01) -> bytes:
    rng = random.Random(func ^ n)
    return b"".join(
        slot(i, int(dur_ns * (1 + rng.uniform(-jitter, jitter))), tgid, tgid, b"a", func=func)
        for i in range(n)
    )


def test_median_interval_narrows_with_walks_and_widens_with_spread() -> None:
    rng = random.Random(1)
    tight = sorted(int(1e4 * rng.uniform(0.99, 1.01)) for _ in range(400))
    spread = sorted(int(1e4 * rng.lognormvariate(0, 1)) for _ in range(400))
    few = sorted(int(1e4 * rng.lognormvariate(0, 1)) for _ in range(40))
    assert enough.median_ci_rel(tight) < 0.01
    assert enough.median_ci_rel(few) > enough.median_ci_rel(spread) > 0.05
    assert enough.median_ci_rel([]) == math.inf


def test_watch_sees_only_its_process_and_what_came_after_it(tmp_path: Path) -> None:
    raw = tmp_path / "latency.jsonl.raw"
    me, other = os.getpid(), os.getpid() + 1
    raw.write_bytes(walks(500, MIGRATE, me))  # before the window: not ours to count
    w = enough.WalkWatch(raw, ci_pct=5, min_walks=400)
    with open(raw, "ab") as f:
        f.write(walks(450, MIGRATE, me) + walks(450, REMOVE, me) + walks(900, MIGRATE, other))
        f.write(slot(1, 1, me, me, b"a", func=REMOVE)[:20])  # a record half written
    assert w.tight()
    assert {k: len(v) for k, v in w.walks.items()} == {MIGRATE: 450, REMOVE: 450}
    # the half record is read once it is whole
    with open(raw, "ab") as f:
        f.write(slot(1, 1, me, me, b"a", func=REMOVE)[20:])
    w.read()
    assert len(w.walks[REMOVE]) == 451
    s = w.summary(True)
    assert (s["stopped"], s["walks_seen"]) == ("interval tight", 901) and 0 < s["ci_pct"] < 5


def test_watch_is_not_tight_until_every_function_has_enough(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"")
    w = enough.WalkWatch(raw, ci_pct=5, min_walks=400)
    raw.write_bytes(walks(2000, MIGRATE, os.getpid()) + walks(100, REMOVE, os.getpid()))
    assert not w.tight()
    assert not enough.WalkWatch(tmp_path / "absent.raw", 5, 400).tight()


def test_batches_cover_every_index_once() -> None:
    assert enough.batches(1000, 400, 200) == [(0, 400), (400, 600), (600, 800), (800, 1000)]
    assert enough.batches(100, 400, 200) == [(0, 100)]
    assert enough.batches(0, 400, 200) == []


@pytest.fixture
def own_pages() -> Iterator[list[int]]:
    region = mmap.mmap(-1, 2000 * 4096)
    region.write(b"\1" * len(region))  # faulted in: move_pages sees every page
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    yield [start + i * 4096 for i in range(2000)]


def test_move_stops_after_the_first_batch_once_tight(tmp_path: Path, own_pages: list[int]) -> None:
    """The collector's file already holds a tight sample of this process's walks when
    the first batch ends: move_pages (real, to node 0, where the pages are) runs once."""
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"")
    w = enough.WalkWatch(raw, ci_pct=5, min_walks=400)
    raw.write_bytes(walks(400, MIGRATE, os.getpid()))
    got = enough.move_until_tight(os.getpid(), own_pages, 0, w)
    assert got["requested"] == 400 and got["stopped"] == "interval tight"
    assert got["moved"] + got["already"] + got["failed"] == 400


def test_move_walks_every_page_while_the_interval_is_wide(
    tmp_path: Path, own_pages: list[int]
) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"")
    w = enough.WalkWatch(raw, ci_pct=0.01, min_walks=400)
    raw.write_bytes(walks(400, MIGRATE, os.getpid(), jitter=0.5))
    got = enough.move_until_tight(os.getpid(), own_pages, 0, w)
    assert got["requested"] == 2000 and got["stopped"] == "every page"
    assert enough.move_until_tight(os.getpid(), own_pages[:10], 0, None)["requested"] == 10


def test_stop_detail_says_how_a_window_ended() -> None:
    tight = {"stopped": "interval tight", "walks_seen": 812, "ci_pct": 3.1}
    assert enough.stop_detail(tight) == "interval tight after 812 walks, +-3.1%"
    none = {"stopped": "every page", "walks_seen": 0, "ci_pct": None}
    assert enough.stop_detail(none) == "no walks in this window"
