"""The spec: valid files load, every kind of bad input is one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.spec import check_fits_host, load_spec, load_spec_text

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")))
def test_shipped_specs_load(path: Path) -> None:
    spec, raw, sha = load_spec(path)
    assert spec.name == raw["name"]
    assert len(sha) == 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nbogus: 1", "x.yaml: bogus: unknown key"),
        ("name: a\nfleet: {memory_mib: 4G}", "x.yaml: fleet.memory_mib: "),
        ("name: a\nworkload: {mib: -1}", "x.yaml: workload.mib: Input should be greater than 0"),
        ("name: a\nworkload: {dup: 0.5}", "x.yaml: workload: dup + zero + unique + volatile must"),
        ('name: "a\'b"', "x.yaml: name: use letters"),
        ("name: a/b", "x.yaml: name: use letters"),
        ('name: "<x>"', "x.yaml: name: use letters"),
        ("name: a\nksm: {frobnicate: 1}", "x.yaml: ksm.frobnicate: unknown KSM knob"),
        (
            "name: a\nksm: {pages_to_scan: [100, 0]}",
            "x.yaml: ksm.pages_to_scan.1: expected an integer in [1, 1000000], got 0",
        ),
        (
            "name: a\nksm: {pages_to_scan: [100, 100]}",
            "x.yaml: ksm.pages_to_scan.1: pages_to_scan value 100 is listed twice",
        ),
        ("name: a\nksm: {pages_to_scan: []}", "x.yaml: ksm.pages_to_scan: a sweep needs"),
        ("name: a\nksm: {advisor_mode: [none, fast]}", "x.yaml: ksm.advisor_mode.1: expected one"),
        ("name: a\nksm: {run: [0, 1]}", "x.yaml: ksm.run: run is set by densitylab"),
        (
            "name: a\nksm: {advisor_min_pages_to_scan: [10, 900], advisor_max_pages_to_scan: 500}",
            "x.yaml: ksm.advisor_min_pages_to_scan: above advisor_max_pages_to_scan 500",
        ),
        (
            "name: a\ncapacity: {ksmd_cpu_max_pct: 0}",
            "x.yaml: capacity.ksmd_cpu_max_pct: Input should be greater than 0",
        ),
        ("name: a\ncapacity: {reserve_mib: -1}", "x.yaml: capacity.reserve_mib: Input should be"),
        ("name: a\ncapacity: {settle_max_s: 5m}", "x.yaml: capacity.settle_max_s: "),
        ("name: a\ncapacity: {budget: 1}", "x.yaml: capacity.budget: unknown key"),
        (
            "name: a\nfleet: {count: [1, 0]}",
            "x.yaml: fleet.count.1: Input should be greater than 0",
        ),
        ("name: a\nfleet: {accel: xen}", "x.yaml: fleet.accel: "),
        ("fleet: {count: 1}", "x.yaml: name: Field required"),
        ("[1, 2]", "x.yaml: expected a mapping"),
        ("name: a\n  b: : c", "x.yaml: line"),
    ],
)
def test_bad_specs_name_the_field(text: str, expected: str) -> None:
    with pytest.raises(UsageError) as e:
        load_spec_text(text, "x.yaml")
    msg = str(e.value)
    assert msg.startswith(expected), msg
    assert "\n" not in msg


def test_fleet_larger_than_host_is_refused() -> None:
    spec, _ = load_spec_text("name: a\nfleet: {count: 100, memory_mib: 1024}", "x.yaml")
    with pytest.raises(UsageError, match=r"^x.yaml: fleet.memory_mib: 100 guests x 1024 MiB"):
        check_fits_host(spec, available_mib=24_000, source="x.yaml")
    check_fits_host(spec, available_mib=200_000, source="x.yaml")


def test_workload_must_fit_in_the_guest() -> None:
    spec, _ = load_spec_text("name: a\nfleet: {memory_mib: 128}\nworkload: {mib: 128}", "x.yaml")
    with pytest.raises(UsageError, match=r"^x.yaml: workload.mib"):
        check_fits_host(spec, available_mib=200_000, source="x.yaml")


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\nworkload: {mib: -5}\n")
    for cmd in (["plan", str(bad)], ["run", str(bad), "--results", str(tmp_path / "r")]):
        cp = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *cmd],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cp.returncode == 2, cp.stderr
        assert cp.stderr.strip().splitlines() == [
            f"densitylab: {bad}: workload.mib: Input should be greater than 0, got -5"
        ]
    assert not (tmp_path / "r").exists(), "a refused spec must leave nothing behind"


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nope\.yaml: cannot read"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("phases", "field"),
    [
        ("migrate: {enabled: true, method: compaction}", "phases.migrate.method"),
        ("migrate: {enabled: true, method: offline}", "phases.migrate.method"),
        ("reclaim: {enabled: true, method: v1-limit-steps}", "phases.reclaim.method"),
    ],
)
def test_lab_host_refuses_trigger_methods_it_cannot_run(phases: str, field: str) -> None:
    text = f"name: x\nhost: {{kind: labvm}}\nkernels: ['7.3']\nphases:\n  {phases}\n"
    with pytest.raises(UsageError) as e:
        load_spec_text(text, "x.yaml")
    assert str(e.value).startswith(f"x.yaml: {field}: ") and "labvm" in str(e.value)


@pytest.mark.parametrize(
    ("trigger", "method"),
    [("migrate", "compaction"), ("migrate", "offline"), ("reclaim", "v1-limit-steps")],
)
def test_lab_host_refuses_methods_it_cannot_run(tmp_path: Path, trigger: str, method: str) -> None:
    """A lab VM migrates between NUMA nodes and reclaims with memory.reclaim: any other
    method is refused by the spec (so by `plan`), naming the field and the backend."""
    p = tmp_path / "lab.yaml"
    p.write_text(
        "name: lab\nhost: {kind: labvm}\nkernels: ['6.12']\n"
        f"phases: {{{trigger}: {{enabled: true, method: {method}}}}}\n"
    )
    with pytest.raises(UsageError, match=rf"phases\.{trigger}\.method.*host\.kind labvm") as e:
        load_spec(p)
    assert "\n" not in str(e.value)


def test_stop_rule_defaults_and_bounds() -> None:
    spec, _ = load_spec_text("name: a\nlatency: {stop_when_tight: {}}", "x.yaml")
    assert spec.latency.stop_when_tight is not None
    assert (spec.latency.stop_when_tight.ci_pct, spec.latency.stop_when_tight.min_walks) == (5, 400)
    assert load_spec_text("name: a", "x.yaml")[0].latency.stop_when_tight is None
    with pytest.raises(UsageError, match=r"^x.yaml: latency.stop_when_tight.ci_pct"):
        load_spec_text("name: a\nlatency: {stop_when_tight: {ci_pct: 0}}", "x.yaml")
    with pytest.raises(UsageError, match=r"^x.yaml: latency.stop_when_tight.min_walks"):
        load_spec_text("name: a\nlatency: {stop_when_tight: {min_walks: 3}}", "x.yaml")
