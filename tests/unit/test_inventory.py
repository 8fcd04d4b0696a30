"""Inventories read by Ansible's own parser, SSH options, kernel-switch helpers and the
lab check's table, without any lab machine."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from orchestrator import cli, fleet, kbuild, lab
from orchestrator import inventory as inv
from orchestrator.hosts.inventory import MACHINE_NEEDS
from orchestrator.spec import load_spec_text

DATA = Path(__file__).resolve().parents[1] / "data"

INI = """\
[lab]
m1 ansible_host=10.0.0.1 ansible_port=2222
m2 ansible_host=10.0.0.2 ansible_user=ci ansible_become=true

[lab:vars]
ansible_ssh_private_key_file=keys/id_lab

[other]
x1 ansible_user=root
"""
YAML = """\
all:
  children:
    lab:
      hosts:
        a: {ansible_host: 192.0.2.5, ansible_user: root, ansible_port: 2200}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_ini_inventory_gives_typed_machines(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts.ini", INI)
    m1, m2 = inv.load_inventory(path, "lab")
    assert (m1.name, m1.address, m1.port, m1.user, m1.become) == (
        "m1",
        "10.0.0.1",
        2222,
        "root",
        False,
    )
    # relative key paths are relative to the inventory file, not to the cwd
    assert m1.private_key == tmp_path / "keys" / "id_lab"
    assert (m2.user, m2.port, m2.become) == ("ci", 22, True)
    assert [m.name for m in inv.load_inventory(path, "all")] == ["m1", "m2", "x1"]
    assert [m.name for m in inv.load_inventory(path, "lab:!m1")] == ["m2"]


def test_yaml_inventory(tmp_path: Path) -> None:
    (a,) = inv.load_inventory(write(tmp_path, "hosts.yml", YAML), "lab")
    assert (a.name, a.address, a.port, a.private_key) == ("a", "192.0.2.5", 2200, None)


@pytest.mark.parametrize(
    ("name", "text", "pattern", "message"),
    [
        ("hosts.ini", INI, "nope", "pattern 'nope' matches no host"),
        ("hosts.ini", INI, "lab:&other", "matches no host"),
        ("bad.ini", "garbage [[[\n", "all", "not a readable inventory"),
    ],
)
def test_bad_inventory_or_empty_pattern_is_a_usage_error(
    tmp_path: Path, name: str, text: str, pattern: str, message: str
) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(inv.InventoryError, match=message) as e:
        inv.load_inventory(path, pattern)
    assert str(e.value).startswith(f"{path}: ")


def test_lab_check_cli_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.ini"
    assert cli.main(["lab", "check", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"densitylab: {missing}: no such inventory file"]
    path = write(tmp_path, "hosts.ini", INI)
    assert cli.main(["lab", "check", str(path), "--pattern", "web"]) == 2
    assert "pattern 'web' matches no host" in capsys.readouterr().err


def test_ssh_never_reads_the_users_ssh_config(tmp_path: Path) -> None:
    m = inv.Machine("m", "10.0.0.1", 2222, "root", tmp_path / "k")
    args = inv.ssh_options(m, tmp_path / "cm", tmp_path / "known_hosts")
    joined = " ".join(args)
    assert args[:2] == ["-F", "/dev/null"]
    assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in joined
    assert "GlobalKnownHostsFile=/dev/null" in joined and "BatchMode=yes" in joined
    assert "IdentitiesOnly=yes" in joined and "IdentityAgent=none" in joined
    assert "~" not in joined and "/.ssh" not in joined


def test_sudo_only_for_a_non_root_become_user(tmp_path: Path) -> None:
    with inv.SshTransport(inv.Machine("m", "h", 22, "ci", None, become=True)) as t:
        assert t.ssh_argv(["uname", "-r"])[-1] == "sudo -n -- uname -r"
    with inv.SshTransport(inv.Machine("m", "h", 22, "root", None)) as t:
        assert t.ssh_argv(["echo", "a b"])[-1] == "echo 'a b'"


def test_a_closed_port_is_unreachable_with_sshs_reason() -> None:
    port = inv_free_port()
    dead = inv.Machine("dead", "127.0.0.1", port, "root", None)
    with inv.SshTransport(dead) as t, pytest.raises(inv.Unreachable) as e:
        t.run(["true"], timeout_s=30)
    assert str(e.value).startswith("dead: unreachable: ")
    assert "refused" in e.value.reason or "closed" in e.value.reason


def inv_free_port() -> int:
    from orchestrator.labvms import free_port

    return free_port()


def test_kexec_keeps_the_running_cmdline_without_boot_loader_tokens() -> None:
    line = "BOOT_IMAGE=/vmlinuz-6.12.111+deb13-amd64 root=/dev/vda rw initrd=/x console=ttyS0\n"
    assert inv.kexec_cmdline(line) == "root=/dev/vda rw console=ttyS0"
    argv = inv.kexec_argv("/boot/vmlinuz-7", "/boot/initrd.img-7", "root=/dev/vda")
    assert argv == ["kexec", "-l", "/boot/vmlinuz-7", "--initrd=/boot/initrd.img-7",
                    "--command-line=root=/dev/vda"]  # fmt: skip


def test_grub_reboot_entry_is_the_submenu_path_of_that_release() -> None:
    cfg = (DATA / "inventory" / "grub-debian13.cfg").read_text()
    uuid = "854f8abd-7bf8-42fb-a488-c5ea1eb0c801"
    assert inv.grub_entry(cfg, "6.12.111+deb13-amd64") == (
        f"gnulinux-advanced-{uuid}>gnulinux-6.12.111+deb13-amd64-advanced-{uuid}"
    )
    # a release that is a prefix of another picks its own entry, never a recovery one
    assert inv.grub_entry(cfg, "6.12.11+deb13-amd64").endswith(
        f">gnulinux-6.12.11+deb13-amd64-advanced-{uuid}"
    )
    with pytest.raises(inv.HostError, match=r"no GRUB menu entry for 7\.3\.4"):
        inv.grub_entry(cfg, "7.3.4")


def test_domain_xml_forwards_ssh_only_when_asked(tmp_path: Path) -> None:
    base = fleet.GuestSpec("g", 512, 2, fleet.GuestImage(kernel=tmp_path / "k"), tmp_path / "c.log")
    plain = fleet.domain_xml(base, run_id="r", trial_id="t", domain_type="qemu")
    assert "qemu:commandline" not in plain
    spec = fleet.GuestSpec(**{**base.__dict__, "ssh_port": 40022})
    xml = fleet.domain_xml(spec, run_id="r", trial_id="t", domain_type="qemu")
    ns = "{http://libvirt.org/schemas/domain/qemu/1.0}"
    args = [a.get("value") for a in ElementTree.fromstring(xml).iter(f"{ns}arg")]
    assert args == ["-netdev", "user,id=dlnet0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22",
                    "-device", "virtio-net-pci,netdev=dlnet0,bus=pci.0,addr=0x1e"]  # fmt: skip


def host_facts() -> dict[str, object]:
    """This machine's own probe (the agent's real output)."""
    from orchestrator.agent import probe

    return json.loads(json.dumps(probe.probe_host(check_bpf=False)))


def test_spec_problems_name_what_the_machine_lacks() -> None:
    facts = host_facts()
    text = """\
name: t
phases:
  migrate: {enabled: true, method: numa}
  reclaim: {enabled: true, method: memory.reclaim}
latency: {method: kprobe}
"""
    spec, _ = load_spec_text(text, "t.yaml")
    problems = lab.spec_problems(spec, facts)  # type: ignore[arg-type]
    numa = facts["numa"]["value"]  # type: ignore[index]
    assert any("numa needs 2 NUMA nodes" in p for p in problems) == (numa < 2)
    cg = facts["cgroup"]["value"]  # type: ignore[index]
    assert any("memory.reclaim needs cgroup v2" in p for p in problems) == (cg != "v2")
    methods = facts["tracing"]["value"]  # type: ignore[index]
    assert any("latency.method kprobe" in p for p in problems) == ("kprobe" not in methods)


def test_cpu_model_of_this_machine() -> None:
    text = Path("/proc/cpuinfo").read_text()
    expected = next(
        ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")
    )
    assert lab.cpu_model(text) == expected
    assert lab.cpu_model("processor\t: 0\n") == ""


def test_a_copied_kernel_must_bring_networking_and_kexec(tmp_path: Path) -> None:
    """What a lab machine needs of a kernel with no package, read from its .config."""
    config = tmp_path / "config"
    config.write_text("CONFIG_INET=y\n# CONFIG_KEXEC is not set\nCONFIG_KSM=y\n")
    b = kbuild.Bootable("mine", "6.12.0-dl", tmp_path / "bzImage", None, "build:x", {}, config)
    assert b.lacks(MACHINE_NEEDS) == ["CONFIG_KEXEC|CONFIG_KEXEC_FILE"]
    config.write_text("CONFIG_INET=y\nCONFIG_KEXEC_FILE=y\n")
    assert b.lacks(MACHINE_NEEDS) == []
    unknown = kbuild.Bootable("mine", "6.12.0-dl", tmp_path / "bzImage", None, "build:x", {})
    assert unknown.lacks(MACHINE_NEEDS) == list(MACHINE_NEEDS)
