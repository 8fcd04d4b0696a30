"""Two lab-host VMs as real lab machines: an Ansible inventory on loopback SSH ports.

Booted through libvirt from the lab image (TCG, user-mode NIC with hostfwd, sshd
started by the image's init, a key pair made here). Real OpenSSH, real ansible-runner,
real kexec between the image's two kernels. Only kexec can be exercised: the VMs boot
their kernel directly (no GRUB), so the `reboot` method is covered by unit tests only.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import cli, kbuild, lab, labimage, labvms
from orchestrator import inventory as inv
from orchestrator.errors import HostBusy, HostError
from orchestrator.hosts.inventory import MACHINE_NEEDS
from orchestrator.kernelspec import DebianSource, SourceKernel
from tests.labvmset import lab_vms

pytestmark = [pytest.mark.system, pytest.mark.slow]


@pytest.fixture(scope="module")
def vms(lab: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[labvms.LabVms]:
    with lab_vms(tmp_path_factory.mktemp("lab-vms")) as started:
        yield started


@pytest.fixture(scope="module")
def machines(vms: labvms.LabVms) -> list[inv.Machine]:
    return inv.load_inventory(Path(vms.inventory), "lab")


def test_lab_check_prints_both_machines_and_names_a_dead_one(
    vms: labvms.LabVms, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["lab", "check", vms.inventory, "--pattern", "lab"]) == 0
    table = capsys.readouterr().out
    print(table)
    release = labimage.find_lab_image().kernel("6.12").release
    for name in ("vm0", "vm1"):
        line = next(ln for ln in table.splitlines() if f" {name} " in ln)
        row = dict(zip(lab.COLUMNS, (c.strip() for c in line.split("│")[1:-1]), strict=True))
        # the machine's facts: kernel, KSM writable, cgroup v2, two NUMA nodes
        assert (row["kernel"], row["KSM"], row["cgroup"], row["NUMA"]) == (
            release,
            "yes",
            "v2",
            "2",
        )
        assert int(row["free MiB"]) > 500 and row["CPU model"] not in ("", "?")
    dead = Path(vms.inventory).with_name("with-dead.ini")
    text = Path(vms.inventory).read_text()
    dead.write_text(
        text.replace(
            "[lab:vars]",
            f"dead ansible_host=127.0.0.1 ansible_port={labvms.free_port()}\n\n[lab:vars]",
        )
    )
    assert cli.main(["lab", "check", str(dead), "--pattern", "lab"]) == 1
    captured = capsys.readouterr()
    print(captured.out)
    assert " vm0 " in captured.out and " vm1 " in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("densitylab: dead (root@127.0.0.1:")
    assert "unreachable" in errors[0] and "refused" in errors[0]


def test_ssh_per_call_cost_and_files(machines: list[inv.Machine]) -> None:
    with inv.SshTransport(machines[0]) as t:
        ms = inv.ssh_ms_per_call(t, calls=10)
        print(f"\nssh: {ms:.0f} ms per call over the master connection")
        data = bytes(range(256)) * 64
        t.write("/run/densitylab-test/blob", data, 0o640)
        assert t.read("/run/densitylab-test/blob") == data
        assert t.run(["stat", "-c", "%a", "/run/densitylab-test/blob"]).strip() == "640"
        with pytest.raises(inv.RemoteError, match=r"vm0: ls /nonexistent exited 2: .*No such file"):
            t.run(["ls", "/nonexistent"])


def test_prepare_is_idempotent_offline(machines: list[inv.Machine], tmp_path: Path) -> None:
    first = lab.prepare(machines, tmp_path / "first")
    print(f"\nprepare: first run {first.elapsed_s:.1f} s {first.stats}")
    assert set(first.stats) == {"vm0", "vm1"}
    assert all(st["failures"] == 0 and st["dark"] == 0 for st in first.stats.values())
    second = lab.prepare(machines, tmp_path / "second")
    print(f"prepare: second run {second.elapsed_s:.1f} s {second.stats}")
    assert all(st["changed"] == 0 for st in second.stats.values()), second.stats
    with inv.SshTransport(machines[1]) as t:
        assert "libvirt" in t.run(["virsh", "-c", "qemu:///system", "version"]).lower()
        assert t.agent("now").strip().isdigit()


def test_kexec_to_the_other_kernel_and_back(machines: list[inv.Machine]) -> None:
    image = labimage.find_lab_image()
    old, new = image.kernel("6.12").release, image.kernel("7.3").release
    with inv.SshTransport(machines[0]) as t:
        assert t.run(["uname", "-r"]).strip() == old
        there_s = inv.switch_kernel(t, new, "kexec", timeout_s=240)
        assert t.run(["uname", "-r"]).strip() == new
        back_s = inv.switch_kernel(t, old, "kexec", timeout_s=240)
        assert t.run(["uname", "-r"]).strip() == old
        print(f"\nkexec: {old} -> {new} in {there_s:.1f} s, back in {back_s:.1f} s")
        with pytest.raises(inv.KernelSwitchError, match="not installed"):
            inv.switch_kernel(t, "9.9.9-none", "kexec", timeout_s=30)


def dummy_deb(tmp_path: Path) -> Path:
    """A real (tiny) Debian package, built here with dpkg-deb."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/densitylab-test").mkdir(parents=True)
    (root / "usr/share/densitylab-test/marker").write_text("densitylab\n")
    (root / "DEBIAN/control").write_text(
        "Package: densitylab-test-dummy\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: densitylab <dev@densitylab>\nDescription: test package\n"
    )
    deb = tmp_path / "densitylab-test-dummy_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                   capture_output=True, env={**os.environ, "SOURCE_DATE_EPOCH": "0"})  # fmt: skip
    return deb


def test_install_records_only_what_it_added(machines: list[inv.Machine], tmp_path: Path) -> None:
    deb = dummy_deb(tmp_path)
    with inv.SshTransport(machines[1]) as t:
        # by name, already there (offline): nothing new, nothing recorded
        assert inv.install_kernels(t, "run-a", packages=["kexec-tools"]).packages == ()
        rec = inv.install_kernels(t, "run-b", debs=[deb])
        assert rec.packages == ("densitylab-test-dummy",)
        assert [r.packages for r in inv.recorded(t)] == [("densitylab-test-dummy",)]
        assert t.run(["cat", "/usr/share/densitylab-test/marker"]) == "densitylab\n"
        assert inv.remove_installed(t) == ["densitylab-test-dummy"]
        assert "densitylab-test-dummy" not in inv.installed_packages(t)
        assert "kexec-tools" in inv.installed_packages(t)  # it was there before: kept
        assert inv.recorded(t) == []


def leave_workload(t: inv.SshTransport, run_id: str) -> tuple[str, str]:
    """What a killed run leaves on a machine: its trial folder with a workload running
    in a cgroup of its own (started by the agent, as a trial does). (folder, pid)."""
    tag = run_id.replace("-", "_")
    work = f"/run/densitylab/{tag}/t0"
    t.run(["mkdir", "-p", work])
    t.agent("spawn", "--out", f"{work}/w.out", "--pidfile", f"{work}/w.pid",
            "--cgroup", f"densitylab-{tag}-w", "--", "sleep", "600")  # fmt: skip
    return work, t.run(["cat", f"{work}/w.pid"]).strip()


def test_a_held_machine_is_refused_and_clean_spares_its_holder(
    machines: list[inv.Machine],
) -> None:
    live, dead, other = (f"20261202-00000{i}-hold-{i}{i}{i}{i}" for i in range(3))
    m = machines[0]
    with inv.SshTransport(m) as t, inv.SshTransport(m) as t2:
        inv.ship_agent(t)
        held = inv.MachineHold(t, live)
        held.take()
        try:
            with pytest.raises(HostBusy, match=f"{m.name} is held by another run: run {live}"):
                inv.MachineHold(t2, other).take()
            live_dir, live_pid = leave_workload(t, live)
            dead_dir, dead_pid = leave_workload(t, dead)
            swept = lab.sweep([m])[m.name]
            assert swept.kept_for == live and swept.errors == []
            assert f"trial files /run/densitylab/{dead.replace('-', '_')}" in swept.removed
            assert not any(live.replace("-", "_") in r for r in swept.removed)
            assert t.run(["ls", "/proc"]).split().count(live_pid) == 1
            assert dead_pid not in t.run(["ls", "/proc"]).split()
            assert t.run(["ls", "-d", live_dir]).strip() == live_dir
            with pytest.raises(inv.RemoteError):
                t.run(["ls", "-d", dead_dir])
        finally:
            held.release()
        # Released: the next clean takes the rest, and another run may hold the machine.
        swept = lab.sweep([m])[m.name]
        assert swept.kept_for is None and swept.errors == []
        assert live_pid not in t.run(["ls", "/proc"]).split()
        assert "densitylab-" not in t.run(["ls", "/sys/fs/cgroup"])
        # The holder sweeps before its first trial: its own killed attempt's state too.
        other_hold = inv.MachineHold(t2, other)
        other_hold.take()
        try:
            other_dir, other_pid = leave_workload(t, other)
            _, removed, errors = inv.sweep_run_state(t, holder=other)
            assert errors == [] and f"trial files {other_dir.rsplit('/', 1)[0]}" in removed
            assert other_pid not in t.run(["ls", "/proc"]).split()
            with pytest.raises(inv.RemoteError, match=f"held by {other}"):
                inv.sweep_run_state(t, holder=live)
        finally:
            other_hold.release()


def test_a_built_kernel_is_copied_to_boot_and_removed(
    vms: labvms.LabVms,
    machines: list[inv.Machine],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A kernel built from source has no package: it goes into /boot as a file recorded
    for this run, and goes away with the run. The lab fragment's tinyconfig kernel has
    no networking and no kexec, so an inventory run refuses it before touching anything
    (booting a built kernel on a lab machine needs a config with both)."""
    entry = SourceKernel(label="base", source=DebianSource(debian="linux-source-6.12"))
    try:
        b = kbuild.bootable(entry)
    except HostError as e:
        pytest.skip(f"no built base kernel here: {e}")
    assert b is not None and b.lacks(MACHINE_NEEDS) == list(MACHINE_NEEDS)
    spec = tmp_path / "copy.yaml"
    spec.write_text(
        f"name: copyk\nhost: {{kind: inventory, inventory: {vms.inventory}, pattern: lab}}\n"
        "kernels: ['6.12', {label: base, source: {debian: linux-source-6.12}}]\n"
    )
    results = tmp_path / "results"
    assert cli.main(["run", str(spec), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "densitylab: kernel base: config lacks CONFIG_INET, CONFIG_KEXEC|CONFIG_KEXEC_FILE: a "
        "lab machine could not be reached on it over SSH or switched back (add them to "
        "config.fragment)"
    ]
    assert not results.exists() or list(results.iterdir()) == []
    run_id = "20261202-000009-copy-9999"
    with inv.SshTransport(machines[1]) as t:
        rec = inv.install_boot_files(t, run_id, b.release, b.vmlinuz, None)
        assert rec.files == (f"/boot/vmlinuz-{b.release}",)
        copied = t.run(["sha256sum", rec.files[0]]).split()[0]
        assert copied == kbuild.file_sha256(b.vmlinuz)
        assert inv.remove_installed(t, run_id=run_id) == list(rec.files)
        assert f"vmlinuz-{b.release}" not in t.run(["ls", "/boot"]).split()
        assert inv.recorded(t) == []
