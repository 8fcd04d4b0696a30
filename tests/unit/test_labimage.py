"""The lab image builder's own logic: cache key, apt simulation, mmdebstrap and QEMU argv."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from orchestrator import labimage as li
from orchestrator.errors import CommandError, HostError, UsageError
from orchestrator.kernels import DebPackage, KernelArtifact

DATA = Path(__file__).resolve().parents[1] / "data" / "apt"


def inputs() -> li.LabInputs:
    return li.LabInputs(
        kernels=(
            {
                "label": "6.12",
                "release": "6.12.118+deb13-cloud-amd64",
                "packages": {"linux-image-6.12.118+deb13-cloud-amd64": ["6.12.118-1", "07" * 32]},
                "pins": {},
            },
        ),
        includes=("python3", "numactl"),
        variant="apt",
        dpkg_options=("path-exclude=/usr/share/man/*",),
        closure={"libc6": "2.41-12+deb13u5", "python3": "3.13.5-1"},
        host_packages={"mmdebstrap": "1.3.5-7"},
        sources={"images/labhost/densitylab-init": "aa" * 32},
        free_space_mib=1024,
    )


def test_key_ignores_dict_order() -> None:
    a = inputs()
    b = dataclasses.replace(a, closure=dict(reversed(list(a.closure.items()))))
    assert a.key() == b.key()


@pytest.mark.parametrize(
    "change",
    [
        {"closure": {"libc6": "2.41-12+deb13u6", "python3": "3.13.5-1"}},
        {"kernels": ({"label": "6.12", "release": "6.12.119+deb13-cloud-amd64"},)},
        {"includes": ("python3", "numactl", "bpftrace")},
        {"sources": {"images/labhost/densitylab-init": "bb" * 32}},
        {"host_packages": {"mmdebstrap": "1.5.0-1"}},
        {"dpkg_options": ()},
        {"free_space_mib": 2048},
    ],
)
def test_key_changes_with_every_input(change: dict[str, object]) -> None:
    assert dataclasses.replace(inputs(), **change).key() != inputs().key()  # type: ignore[arg-type]


def test_parse_simulation_of_the_recorded_labhost_install() -> None:
    closure = li.parse_simulation((DATA / "simulate-labhost.txt").read_text())
    assert len(closure) == 131
    assert closure["linux-base"] == "4.17~bpo13+1"
    assert closure["linux-image-7.3.4+deb13-cloud-amd64"] == "7.3.4-1~bpo13+1"
    assert closure["libc6"] == "2.41-12+deb13u5"  # "Inst libc6 (...) []"
    # udev (for initramfs-tools) brings systemd's files, but not systemd as /sbin/init
    assert "systemd-sysv" not in closure and "udev" in closure
    upgrade = li.parse_simulation("Inst libc6 [2.41-1] (2.41-2 Debian:13/stable [amd64])\n")
    assert upgrade == {"libc6": "2.41-2"}


def deb(name: str, version: str, arch: str = "amd64") -> DebPackage:
    return DebPackage(name, version, "trixie", "00" * 32, 1, f"pool/{name}.deb", arch)


def artifact(release: str, pins: tuple[DebPackage, ...] = ()) -> KernelArtifact:
    image = deb(f"linux-image-{release}", "1")
    return KernelArtifact(
        release[:4], release, f"debian:{image.pin}", Path("/v"), "0" * 64, "1" * 64,
        packages=(image,), pins=pins,
    )  # fmt: skip


def test_install_list_pins_shared_generic_packages_once() -> None:
    base = deb("linux-base", "4.17~bpo13+1", "all")
    ks = [artifact("6.12.118+deb13-cloud-amd64"), artifact("7.3.4+deb13-cloud-amd64", (base,))]
    assert li.install_list(ks, ("python3",)) == [
        "python3",
        "linux-base=4.17~bpo13+1",
        "linux-image-6.12.118+deb13-cloud-amd64=1",
        "linux-image-7.3.4+deb13-cloud-amd64=1",
    ]
    clash = artifact("6.12.118+deb13-cloud-amd64", (deb("linux-base", "4.12.1", "all"),))
    with pytest.raises(UsageError, match="linux-base"):
        li.install_list([clash, ks[1]], ())


def test_mmdebstrap_argv_is_private_and_unshared(tmp_path: Path) -> None:
    argv = li.mmdebstrap_argv(tmp_path / "root", tmp_path / "t.sources", tmp_path / "debs", ["a"])
    assert argv[0] == "mmdebstrap" and "--mode=unshare" in argv
    assert argv[-3:] == ["trixie", str(tmp_path / "root"), str(tmp_path / "t.sources")]
    assert "--include=a" in argv
    assert not [a for a in argv if "/etc/apt" in a]
    hooks = [a for a in argv if a.startswith("--setup-hook=")]
    assert any("initramfs-tools/hooks/densitylab" in h for h in hooks)
    assert any(h.startswith("--setup-hook=sync-in") for h in hooks)


def test_in_root_never_follows_a_symlink_out_of_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/modules/7.3").mkdir(parents=True)
    (root / "usr/lib/modules/7.3/vmlinuz").write_text("k")
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-7.3").symlink_to("/usr/lib/modules/7.3/vmlinuz")  # absolute
    (root / "lib").symlink_to("usr/lib")
    assert li.in_root(root, "/boot/vmlinuz-7.3") == root / "usr/lib/modules/7.3/vmlinuz"
    assert li.in_root(root, "/lib/modules/7.3/vmlinuz").read_text() == "k"


def test_image_size_leaves_free_space_in_64_mib_steps() -> None:
    assert li.image_size_mib(280 * 2**20, 1024) == 1408  # 322 MiB + 1024, rounded up
    assert li.image_size_mib(0, 1024) == 1024


def test_closure_drift_lists_each_kind_of_difference() -> None:
    drift = li.closure_drift({"a": "1", "b": "1"}, {"b": "2", "c": "1"})
    assert drift == {"only_simulated": ["a"], "only_installed": ["c"], "version_differs": ["b"]}


def plan(**kw: object) -> li.BootPlan:
    kernel = li.LabKernel("7.3", "7.3.4", Path("/o/vmlinuz"), Path("/o/initrd"), "debian:x")
    image = li.LabImage(Path("/o/rootfs.ext4"), (kernel,), Path("/o/m.json"), "k" * 64, True)
    return li.BootPlan(image, kernel, Path("/t/ov.qcow2"), Path("/t/qga.sock"), **kw)  # type: ignore[arg-type]


def test_qemu_argv_has_two_numa_cells_and_direct_kernel_boot() -> None:
    argv = li.qemu_argv(plan())
    joined = " ".join(argv)
    assert "-accel tcg,thread=multi" in joined and "-smp 2" in joined and "-m 4096M" in joined
    assert "node,nodeid=0,cpus=0,memdev=m0" in argv and "node,nodeid=1,cpus=1,memdev=m1" in argv
    assert "memory-backend-ram,size=2048M,id=m1" in argv
    assert argv[argv.index("-append") + 1] == li.CMDLINE
    assert "file=/t/ov.qcow2,format=qcow2,if=virtio,cache=unsafe" in argv
    assert "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0" in argv


def test_numa_layout_validation() -> None:
    assert li.numa_args(plan(numa_nodes=1)) == []
    assert "node,nodeid=1,cpus=2-3,memdev=m1" in li.numa_args(plan(vcpus=4))
    with pytest.raises(UsageError):
        li.numa_args(plan(vcpus=3))


def test_lab_image_kernel_lookup() -> None:
    image = plan().image
    assert image.kernel("7.3") is image.kernel("7.3.4")
    with pytest.raises(UsageError, match=r"no kernel '6\.12'"):
        image.kernel("6.12")


def test_find_lab_image_without_a_build_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="make lab-images"):
        li.find_lab_image(tmp_path)


def test_local_kernels_are_not_installed_into_the_image(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Debian kernels only"):
        li.build_lab_image(["file:/k/bzImage"], out_root=tmp_path, cache_root=tmp_path)


def test_run_in_group_reports_rc_and_log_tail(tmp_path: Path) -> None:
    li.run_in_group(["true"], tmp_path / "ok.log", 10)
    with pytest.raises(CommandError, match="exited 3: boom") as e:
        li.run_in_group(["sh", "-c", "echo boom >&2; exit 3"], tmp_path / "b.log", 10)
    assert e.value.rc == 3
    with pytest.raises(CommandError) as e:
        li.run_in_group(["/nonexistent/mmdebstrap"], tmp_path / "m.log", 10)
    assert e.value.rc == 127


def test_run_in_group_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    with pytest.raises(CommandError) as e:
        li.run_in_group(
            ["sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], tmp_path / "t.log", 0.5
        )
    assert e.value.timed_out and time.monotonic() - t0 < 10
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {grandchild} survived the timeout")
