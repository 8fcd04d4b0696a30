"""A/B hygiene of a source-built pair: what differs, stated in the manifest and report."""

from __future__ import annotations

from pathlib import Path

from orchestrator import abdiff

PATCH = {"name": "0001-ksm-rmap-walk-one-index.patch", "sha256": "a" * 64}
BASE = {"name": "base", "tree_sha256": "t", "config_sha256": "c1", "patches": [],
        "build_key": "k1"}  # fmt: skip
PATCHED = {**BASE, "name": "patched", "patches": [PATCH], "build_key": "k2"}


def cache_with(tmp: Path, configs: dict[str, str]) -> Path:
    for key, text in configs.items():
        (tmp / "builds" / key).mkdir(parents=True)
        (tmp / "builds" / key / "config").write_text(text)
    return tmp


def test_a_patch_on_the_same_tree_and_config_is_one_sentence_no_warning() -> None:
    d = abdiff.source_pair_diff(BASE, PATCHED)
    assert "config_diff" not in d
    lines, warnings = abdiff.report_lines([{"kernels": [BASE, {**PATCHED, "differs_from": d}]}])
    assert lines == [
        "patched differs from base by: patches 0001-ksm-rmap-walk-one-index.patch "
        "(same source tree, same config)."
    ]
    assert warnings == []


def test_configs_that_differ_are_diffed_from_the_kbuild_cache(tmp_path: Path) -> None:
    """Lines as in the built 6.12 tinyconfig and Debian's cloud config."""
    cache = cache_with(
        tmp_path,
        {
            "k1": "CONFIG_KSM=y\n# CONFIG_LRU_GEN is not set\nCONFIG_ZRAM=y\n",
            "k2": "CONFIG_KSM=y\nCONFIG_LRU_GEN=y\nCONFIG_LRU_GEN_ENABLED=y\nCONFIG_ZRAM=m\n",
        },
    )
    b = {**PATCHED, "config_sha256": "c2"}
    d = abdiff.source_pair_diff(BASE, b, cache)
    assert d["config_options_differing"] == 3
    assert d["config_diff"] == [
        "CONFIG_LRU_GEN: n -> y",
        "CONFIG_LRU_GEN_ENABLED: n -> y",
        "CONFIG_ZRAM: y -> m",
    ]
    _, warnings = abdiff.report_lines([{"kernels": [BASE, {**b, "differs_from": d}]}])
    assert warnings == [
        "patched vs base: configs differ in 3 option(s): CONFIG_LRU_GEN: n -> y, "
        "CONFIG_LRU_GEN_ENABLED: n -> y, CONFIG_ZRAM: y -> m"
    ]


def test_a_config_missing_from_the_cache_still_warns(tmp_path: Path) -> None:
    b = {**PATCHED, "config_sha256": "c2"}
    d = abdiff.source_pair_diff(BASE, b, tmp_path)
    assert d["same_config"] is False and "config_diff" not in d
    _, warnings = abdiff.report_lines([{"kernels": [{**b, "differs_from": d}]}])
    assert warnings == ["patched vs base: configs differ"]


def test_other_trees_and_no_patch_are_warned() -> None:
    b = {**BASE, "name": "other", "tree_sha256": "u"}
    _, warnings = abdiff.report_lines(
        [{"kernels": [{**b, "differs_from": abdiff.source_pair_diff(BASE, b)}]}]
    )
    assert warnings == [
        "other vs base: the source trees differ beyond the patches",
        "other vs base: no patch separates them",
    ]


def test_kernels_without_differs_from_give_nothing() -> None:
    assert abdiff.report_lines([{"kernels": [BASE]}, {}]) == ([], [])
