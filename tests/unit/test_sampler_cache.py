"""The sampler's VMA cache against real processes: smaps is read again only when the
process's /proc/PID/maps changes (or the entry is too old), ksm_stat on every sample."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator.agent import sample
from orchestrator.agent.fs import AgentError

# A real process with one mergeable region; each line on stdin maps one more (a new
# VMA in maps and smaps), "q" ends it.
CHILD = """
import mmap, sys
regions = []
def grow():
    m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_MERGEABLE)
    m.write(b"x" * (1 << 20))
    regions.append(m)
grow()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "q":
        break
    grow()
    print("grown", flush=True)
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[str]]:
    if not hasattr(__import__("mmap"), "MADV_MERGEABLE"):
        pytest.skip("this Python's mmap has no MADV_MERGEABLE")
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    try:
        yield p
    finally:
        p.kill()
        p.wait(timeout=10)


def grow(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("g\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "grown"


def test_smaps_reread_only_when_maps_changes(child: subprocess.Popen[str]) -> None:
    cache = sample.VmaCache(max_age_s=3600)
    first = sample.read_process_ksm(child.pid, cache=cache)
    assert first["ram_vmas"] >= 1
    for _ in range(5):  # nothing maps: the count comes from the cache
        assert sample.read_process_ksm(child.pid, cache=cache)["ram_vmas"] == first["ram_vmas"]
    assert cache.smaps_reads == 1
    grow(child)
    grown = sample.read_process_ksm(child.pid, cache=cache)
    assert cache.smaps_reads == 2
    # A new mergeable mapping is one more mergeable VMA (or merged into a neighbour).
    assert grown["ram_vmas"] >= first["ram_vmas"]
    uncached = sample.read_process_ksm(child.pid)["ram_vmas"]
    assert grown["ram_vmas"] == uncached


def test_old_entry_is_read_again(child: subprocess.Popen[str]) -> None:
    cache = sample.VmaCache(max_age_s=0)
    sample.read_process_ksm(child.pid, cache=cache)
    sample.read_process_ksm(child.pid, cache=cache)
    assert cache.smaps_reads == 2


def test_gone_process_is_an_agent_error_and_forgotten(child: subprocess.Popen[str]) -> None:
    cache = sample.VmaCache()
    s = sample.sample_once({"g": child.pid}, None, cache=cache)
    assert s["processes"]["g"]["ram_vmas"] >= 1 and child.pid in cache.entries
    child.kill()
    child.wait(timeout=10)
    with pytest.raises(AgentError):
        cache.mergeable_vmas(child.pid)
    s = sample.sample_once({"g": child.pid}, None, cache=cache)
    assert "g" not in s["processes"]
    sample.sample_once({}, None, cache=cache)
    assert cache.entries == {}
