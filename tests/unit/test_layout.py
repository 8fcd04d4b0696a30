"""The test tree itself: pytest imports test files by basename (no __init__.py), so two
files of one name in unit/ and system/ make the whole collection fail."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_names_are_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
