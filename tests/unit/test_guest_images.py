"""fleet.image (tiny, debian, a user's path) and workload kind playbook: what the spec
accepts, the one-line refusals, and the report's OS-alone / workload split."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import debimage, guestimage
from orchestrator.errors import UsageError
from orchestrator.results.analysis import os_and_workload_savings
from orchestrator.spec import ImagePath, load_spec_text
from tests.conftest import DATA, REPO

PLAY = "workload: {kind: playbook, playbook: playbooks/workloads/idle.yml}\n"
NO_SCRAMBLE = "phases: {attribute: {enabled: false}}\n"


def spec(text: str):  # type: ignore[no-untyped-def]
    return load_spec_text("name: a\n" + text, "x.yaml")[0]


def test_debian_fleet_with_a_playbook_loads() -> None:
    s = spec("fleet: {image: debian}\n" + PLAY + NO_SCRAMBLE)
    assert s.fleet.image == "debian"
    assert s.workload.kind == "playbook" and s.workload.playbook is not None


def test_user_image_with_its_own_kernel_loads() -> None:
    s = spec("fleet: {image: {path: a.qcow2, kernel: k, initrd: i}}\n" + PLAY + NO_SCRAMBLE)
    assert isinstance(s.fleet.image, ImagePath)
    assert (s.fleet.image.path, s.fleet.image.kernel) == ("a.qcow2", "k")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fleet: {image: debian}\nworkload: {kind: playbook}\n", "x.yaml: workload.playbook: "),
        ("fleet: {image: foo}\n", "x.yaml: fleet.image: "),
        ("fleet: {image: {path: a.qcow2, initrd: i}}\n", "x.yaml: fleet.image.initrd: "),
        ("fleet: {image: {path: a.qcow2, colour: red}}\n", "x.yaml: fleet.image.colour: unknown"),
        (PLAY + NO_SCRAMBLE, "x.yaml: fleet.image: workload kind playbook needs debian"),
        ("fleet: {image: debian}\n", "x.yaml: workload.kind: fill runs dlfill in the tiny"),
        ("fleet: {image: debian}\n" + PLAY, "x.yaml: phases.attribute.enabled: the scramble"),
        ("workload: {playbook: p.yml}\n", "x.yaml: workload.playbook: only for kind playbook"),
        (
            "fleet: {image: debian}\n" + PLAY + "phases: {attribute: {enabled: false}, "
            "baseline: {enabled: false}}\n",
            "x.yaml: phases.baseline.enabled: a playbook's saving is measured against",
        ),
    ],
)
def test_bad_image_or_workload_names_the_field(text: str, expected: str) -> None:
    with pytest.raises(UsageError) as e:
        load_spec_text("name: a\n" + text, "x.yaml")
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_files_name_the_field(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    s = spec(f"fleet: {{image: {{path: {disk}}}}}\n" + PLAY + NO_SCRAMBLE)
    with pytest.raises(UsageError, match=rf"^x.yaml: fleet.image.path: {disk}: no such image"):
        guestimage.check_files(s, "x.yaml")
    disk.write_bytes(b"QFI\xfb")
    guestimage.check_files(s, "x.yaml")  # the image exists; the playbook too
    s = spec(f"fleet: {{image: {{path: {disk}}}}}\n" + NO_SCRAMBLE + PLAY.replace("idle", "nope"))
    with pytest.raises(UsageError, match=r"^x.yaml: workload.playbook: .*nope.yml: no such"):
        guestimage.check_files(s, "x.yaml")
    s = spec(f"fleet: {{image: {{path: {tmp_path}}}}}\n" + PLAY + NO_SCRAMBLE)
    with pytest.raises(UsageError, match=r"fleet.image.path: .*: not a regular file"):
        guestimage.check_files(s, "x.yaml")


def test_a_user_image_boots_as_given(tmp_path: Path) -> None:
    disk, kernel = tmp_path / "disk.qcow2", tmp_path / "vmlinuz"
    disk.write_bytes(b"QFI\xfb")
    kernel.write_bytes(b"kernel")
    s = spec(f"fleet: {{image: {{path: {disk}, kernel: {kernel}}}}}\n" + PLAY + NO_SCRAMBLE)
    boot = guestimage.resolve(s, "x.yaml")
    assert (boot.disk, boot.kernel, boot.initrd) == (disk.resolve(), kernel.resolve(), None)
    assert boot.markers is False  # a user's image answers the agent, it prints no markers
    assert boot.hostname_arg is False


def test_cli_run_with_a_missing_image_exits_2_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    disk = tmp_path / "missing.qcow2"
    bad.write_text(
        f"name: a\nfleet: {{image: {{path: {disk}}}}}\n{PLAY}{NO_SCRAMBLE}", encoding="utf-8"
    )
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(bad), "--results",
         str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert cp.returncode == 2, cp.stderr
    assert cp.stderr.strip().splitlines() == [
        f"densitylab: {bad}: fleet.image.path: {disk}: no such image file"
    ]
    assert not (tmp_path / "r").exists()


def test_shipped_playbooks_exist_for_the_shipped_specs() -> None:
    for name in ("idle", "redis", "redis-load", "postgres"):
        assert (REPO / "playbooks" / "workloads" / f"{name}.yml").is_file()
    s = load_spec_text((REPO / "experiments" / "debian-redis.yaml").read_text(), "d.yaml")[0]
    guestimage.check_files(s, "d.yaml")  # run from the repository root, like the CLI


def test_debian_image_key_follows_its_inputs() -> None:
    a = debimage.collect_inputs()
    assert a.key() == debimage.collect_inputs().key()
    from dataclasses import replace

    assert replace(a, includes=(*a.includes, "htop")).key() != a.key()
    assert "redis-server" in a.includes and "python3" in a.includes


def test_savings_split_the_os_from_the_workload() -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["t0", "t1", "t2"],
            "kernel": ["running"] * 3,
            "fleet_size": [3, 2, 4],
            "status": ["successful", "successful", "failed"],
            "baseline_settled": [True, None, True],  # t1: a process fleet, no baseline
            "settled": [True, True, False],
            "baseline_saving_mib": [198.3, 0.0, 10.0],
            "total_saving_mib": [262.2, 50.0, None],
            "ksmd_cpu_s": [3.21, 1.0, None],
        }
    )
    out = os_and_workload_savings(trials)
    assert out is not None and list(out["trial_id"]) == ["t0"]
    row = out.iloc[0]
    assert row["os_alone_mib_per_guest"] == pytest.approx(66.1)
    assert row["with_workload_mib_per_guest"] == pytest.approx(87.4)
    assert row["workload_own_mib_per_guest"] == pytest.approx(21.3)
    assert os_and_workload_savings(trials.iloc[1:]) is None


def test_play_results_from_recorded_job_events() -> None:
    """Job events ansible-runner recorded for playbooks/workloads/idle.yml in two Debian
    guests (TCG, this machine): one row per guest, counts from the stats event, task
    time summed from the per-task durations."""
    import json

    from orchestrator.workload import play_results

    events = json.loads((DATA / "plays" / "idle-2-debian.json").read_text())
    guests = ["dl-4cf022040-2-0-g0", "dl-4cf022040-2-0-g1"]
    rows = play_results(events, [*guests, "dl-never-reached"], "workload", "idle.yml", "timeout")
    by = {r.guest: r for r in rows}
    for g in guests:
        assert by[g].status == "successful" and (by[g].ok, by[g].failures) == (2, 0)
        assert 5.0 < by[g].tasks_s < 6.0
    assert by["dl-never-reached"].status == "timeout" and by["dl-never-reached"].ok == 0
    msgs = [
        e["event_data"]["res"]["msg"]
        for e in events
        if e["event"] == "runner_on_ok" and "msg" in e["event_data"].get("res", {})
    ]
    ids = {m.split("machine-id ")[1] for m in msgs}
    assert len(ids) == 2  # each guest its own machine-id, read by a Python module
