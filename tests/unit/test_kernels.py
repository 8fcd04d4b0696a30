"""Kernel resolution against apt-cache output recorded from the private trixie apt.

tests/data/apt/trixie-kernels.json holds the answers of `apt-cache pkgnames/madison/show`
seen while resolving 6.12, 7.3 and backports (`python -m orchestrator.kernels 6.12 7.3
backports --record ...`, recorded when trixie-security had 6.12.118-1 and
trixie-backports 7.3.4-1~bpo13+1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from orchestrator import kernels as k
from orchestrator.errors import HostError, UsageError

DATA = Path(__file__).resolve().parents[1] / "data" / "apt"


class Recorded:
    """An AptQuery that answers from the recording and fails on anything else."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, args: Sequence[str]) -> str:
        key = " ".join(args)
        self.asked.append(key)
        if key not in self.answers:
            raise AssertionError(f"not recorded: apt-cache {key}")
        return self.answers[key]


@pytest.fixture
def apt() -> Recorded:
    return Recorded(json.loads((DATA / "trixie-kernels.json").read_text()))


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ("6.12.118-1", "6.12.117-1", 1),
        ("6.12.9-1", "6.12.10-1", -1),
        ("7.3.4-1~bpo13+1", "7.3.4-1", -1),  # a backport sorts before the release it follows
        ("4.17~bpo13+1", "4.12.1", 1),
        ("1.0~rc1", "1.0", -1),
        ("1:1.0", "2.0", 1),  # epoch first
        ("1.0a", "1.0", 1),
        ("1.0", "1.0+", -1),
        ("2.36-9+deb12u14", "2.36-9+deb12u4", 1),
        ("6.12.118-1", "6.12.118-1", 0),
    ],
)
def test_compare_versions_follows_dpkg(a: str, b: str, want: int) -> None:
    assert k.compare_versions(a, b) == want
    assert k.compare_versions(b, a) == -want


def test_satisfies_relations() -> None:
    assert k.satisfies("4.17~bpo13+1", ">=", "4.17~")
    assert not k.satisfies("4.12.1", ">=", "4.17~")
    assert k.satisfies("1.0", "<<", "1.1") and k.satisfies("1.0", "=", "1.0")
    with pytest.raises(UsageError):
        k.satisfies("1.0", "!=", "1.0")


def test_parse_relations_keeps_alternatives_and_versions() -> None:
    groups = k.parse_relations(
        "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
        "linux-base-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), kmod, libc6:amd64 (>= 2.38)"
    )
    assert [len(g) for g in groups] == [3, 1, 1, 1]
    assert groups[0][1] == k.Relation("initramfs-tools", ">=", "0.120+deb8u2")
    assert groups[1][0] == k.Relation("linux-base-7.3.4+deb13-cloud-amd64", "=", "7.3.4-1~bpo13+1")
    assert groups[2][0] == k.Relation("kmod")
    assert groups[3][0] == k.Relation("libc6", ">=", "2.38")


def test_parse_madison_names_the_suite(apt: Recorded) -> None:
    rows = k.parse_madison(apt(["madison", "linux-base"]))
    assert rows == [
        k.MadisonRow("linux-base", "4.17~bpo13+1", "trixie-backports"),
        k.MadisonRow("linux-base", "4.12.1", "trixie"),
    ]
    assert k.default_candidate(rows) == rows[1]  # backports is not the default
    assert k.newest(rows) == rows[0]


def test_kernel_candidates_skip_debug_unsigned_and_other_series(apt: Recorded) -> None:
    names = k.kernel_candidates(apt(["pkgnames", "linux-image-"]), "6.12")
    assert names and all(n.startswith("linux-image-6.12.") for n in names)
    assert not [n for n in names if n.endswith(("-dbg", "-unsigned"))]
    assert "linux-image-6.12.115+deb13.1-cloud-amd64" in names  # a +debNN.M respin counts
    exact = k.kernel_candidates(apt(["pkgnames", "linux-image-"]), "6.12.118")
    assert exact == ["linux-image-6.12.118+deb13-cloud-amd64"]
    assert k.kernel_candidates("linux-image-6.1.0-56-cloud-amd64\n", "6.1") == []


def test_resolve_6_12_takes_the_newest_from_security(apt: Recorded) -> None:
    r = k.resolve_kernel(k.parse_kernel_spec("6.12"), apt)
    assert (r.label, r.release) == ("6.12", "6.12.118+deb13-cloud-amd64")
    assert [(p.name, p.version, p.suite) for p in r.packages] == [
        ("linux-image-6.12.118+deb13-cloud-amd64", "6.12.118-1", "trixie-security")
    ]
    assert r.pins == ()  # trixie's linux-base 4.12.1 meets >= 4.12~
    assert r.image.sha256 == ("07f23ba1de88377d700e1e2f5b2ee495ff89b0d0bb73fdbd3eac8f6b27609b9a")
    assert r.image.deb_name == "linux-image-6.12.118+deb13-cloud-amd64_6.12.118-1_amd64.deb"


def test_resolve_7_3_follows_the_split_packages_and_pins_linux_base(apt: Recorded) -> None:
    r = k.resolve_kernel(k.parse_kernel_spec("7.3"), apt)
    assert (r.label, r.release) == ("7.3", "7.3.4+deb13-cloud-amd64")
    assert sorted(p.name for p in r.packages) == [
        "linux-base-7.3.4+deb13-cloud-amd64",
        "linux-binary-7.3.4+deb13-cloud-amd64",
        "linux-image-7.3.4+deb13-cloud-amd64",
        "linux-modules-7.3.4+deb13-cloud-amd64",
    ]
    assert {p.version for p in r.packages} == {"7.3.4-1~bpo13+1"}
    assert {p.suite for p in r.packages} == {"trixie-backports"}
    assert [(p.name, p.version, p.arch) for p in r.pins] == [("linux-base", "4.17~bpo13+1", "all")]
    assert r.pins[0].deb_name == "linux-base_4.17~bpo13+1_all.deb"


def test_backports_means_what_the_meta_package_points_at(apt: Recorded) -> None:
    r = k.resolve_kernel(k.parse_kernel_spec("backports"), apt)
    assert r == k.resolve_kernel(k.parse_kernel_spec("7.3"), apt)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("6.12", k.KernelSpec("6.12", debian="6.12")),
        ("7.3", k.KernelSpec("7.3", debian="7.3")),
        ("6.12.118", k.KernelSpec("6.12.118", debian="6.12.118")),
        ("backports", k.KernelSpec("backports", debian="backports")),
        (
            "file:/k/bzImage,initrd=/k/initrd,label=mine",
            k.KernelSpec(
                "file:/k/bzImage,initrd=/k/initrd,label=mine",
                bzimage=Path("/k/bzImage"),
                initrd=Path("/k/initrd"),
                label="mine",
            ),
        ),
    ],
)
def test_parse_kernel_spec(text: str, want: k.KernelSpec) -> None:
    assert k.parse_kernel_spec(text) == want


@pytest.mark.parametrize("text", ["", "linux", "6", "file:/k/bzImage,initrd", "file:/x,foo=1"])
def test_parse_kernel_spec_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="kernel spec"):
        k.parse_kernel_spec(text)


def test_unknown_series_is_a_host_error(apt: Recorded) -> None:
    apt.answers["pkgnames linux-image-"] += "linux-image-9.9.1+deb13-cloud-amd64-dbg\n"
    with pytest.raises(HostError, match=r"no linux-image-9\.9"):
        k.resolve_kernel(k.parse_kernel_spec("9.9"), apt)


CONFIG = """\
CONFIG_KSM=y
CONFIG_KPROBES=y
CONFIG_KPROBE_EVENTS=y
CONFIG_NUMA=y
CONFIG_ZRAM=m
CONFIG_MEMCG=y
CONFIG_LOCALVERSION=""
# CONFIG_DEBUG_INFO_BTF is not set
"""


def test_config_check_accepts_zram_as_module_and_records_noted_options() -> None:
    values, missing = k.check_config(k.parse_kconfig(CONFIG))
    assert missing == []
    assert values["CONFIG_ZRAM"] == "m" and values["CONFIG_DEBUG_INFO_BTF"] == "n"


def test_config_check_names_what_is_missing() -> None:
    text = CONFIG.replace("CONFIG_KSM=y", "# CONFIG_KSM is not set").replace(
        "CONFIG_KPROBE_EVENTS=y\n", ""
    )
    values, missing = k.check_config(k.parse_kconfig(text))
    assert missing == ["CONFIG_KSM", "CONFIG_KPROBE_EVENTS"]
    art = k.KernelArtifact(
        "6.12", "6.12.1", "file:/x", Path("/x"), "0" * 64, None, values, tuple(missing)
    )
    with pytest.raises(HostError, match="CONFIG_KSM=n, CONFIG_KPROBE_EVENTS=n"):
        art.require_lab_features()


def fake_bzimage(version: bytes) -> bytes:
    data = bytearray(0x4000)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x3000 - 0x200).to_bytes(2, "little")
    data[0x3000 : 0x3000 + len(version)] = version
    return bytes(data)


def test_bzimage_release_reads_the_boot_header() -> None:
    blob = fake_bzimage(b"7.3.0-rc1-dl (root@lab) #1 SMP PREEMPT_DYNAMIC\0")
    assert k.bzimage_release(blob) == "7.3.0-rc1-dl"
    assert k.series_of("7.3.0-rc1-dl") == "7.3"
    with pytest.raises(UsageError, match="HdrS"):
        k.bzimage_release(b"\0" * 0x400)


def test_local_kernel_from_files(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(fake_bzimage(b"6.13.0-dl #2\0"))
    (tmp_path / "config").write_text(CONFIG)
    art = k.local_kernel(k.parse_kernel_spec(f"file:{tmp_path}/bzImage,config={tmp_path}/config"))
    assert (art.label, art.release, art.missing) == ("6.13", "6.13.0-dl", ())
    assert art.origin == f"file:{tmp_path}/bzImage" and art.config_sha256
    with pytest.raises(UsageError, match="initrd"):
        k.local_kernel(k.parse_kernel_spec(f"file:{tmp_path}/bzImage,initrd=/nonexistent"))


def test_private_apt_configuration_stays_under_its_root(tmp_path: Path) -> None:
    apt = k.PrivateApt(tmp_path / "apt")
    conf = apt.conf_text()
    paths = [line.split('"')[1] for line in conf.splitlines() if line.startswith("Dir::")]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)
    assert '"/etc/apt' not in conf  # no setting starts there
    sources = k.sources_deb822()
    assert "Suites: trixie trixie-updates trixie-backports" in sources
    assert "URIs: http://deb.debian.org/debian-security\nSuites: trixie-security" in sources
    assert sources.count(f"Signed-By: {k.KEYRING}") == 2
