"""Input that cannot hurt (issue 12, item 2): malformed and hostile specs, run
directories and arguments, each through the real command line.

Every case must end in exactly one line on stderr that names the file (or the option)
and the field, exit code 2, no traceback, within 5 s, and nothing created: the working
directory (where results/ and reports/ would go) is the same afterwards. `run` must
refuse before it asks the host anything: the doctor, libvirt and the run store are
tripwires here. The cases that used to hang or fill memory run in a subprocess killed
after 5 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import cli
from tests.synthetic import make_run

REPO = Path(__file__).resolve().parents[2]
HOSTILE = REPO / "tests" / "data" / "hostile"
LIMIT_S = 5.0

# --------------------------------------------------------------------------- helpers


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def check_line(err: str, where: str, field: str) -> str:
    """Exactly one printable line: `densitylab: <where>...<field>...`."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"densitylab: {where}"), line
    assert field in line, line
    assert line.isprintable() and len(line) < 400, line
    return line


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, where default results/ and reports/ would go."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


Cli = Callable[..., str]


@pytest.fixture
def densitylab(cwd: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """cli.main in this process: returns stderr after checking exit 2, time, no files."""

    def call(*args: str) -> str:
        before = tree(cwd)
        t0 = time.monotonic()
        rc = cli.main(list(args))
        elapsed = time.monotonic() - t0
        err = capsys.readouterr().err
        assert rc == 2, err
        assert elapsed < LIMIT_S, f"{elapsed:.1f} s"
        assert tree(cwd) == before, "a refused command created files"
        return err

    return call


def subprocess_cli(cwd: Path, *args: str) -> str:
    """The command line in a child killed after LIMIT_S: for the inputs that used to
    hang `plan` or fill memory."""
    before = tree(cwd)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cp = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=LIMIT_S,
    )
    assert cp.returncode == 2, cp.stderr
    assert tree(cwd) == before, "a refused command created files"
    return cp.stderr


@pytest.fixture
def host_tripwires(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` must refuse bad input before it probes the host, connects to libvirt or
    makes a run directory: any of them called fails the test."""
    pytest.importorskip("libvirt")
    from orchestrator import doctor, fleet, store

    def touched(*_: object, **__: object) -> None:
        raise AssertionError("bad input reached the host")

    monkeypatch.setattr(doctor, "run_doctor", touched)
    monkeypatch.setattr(fleet, "connect", touched)
    monkeypatch.setattr(store.RunStore, "create", touched)


# --------------------------------------------------------------------------- specs

LABVM = "host: {kind: labvm, memory_mib: 4096, vcpus: 2, numa_cells: 2}\n"

# (case id, spec text, what the line must name after the file)
SPEC_CASES = [
    # size and shape
    ("scalar-document", "just a string\n", "expected a mapping"),
    ("empty-file", "", "expected a mapping"),
    ("two-documents", "name: a\n---\nname: b\n", "line 2: not valid YAML"),
    ("unhashable-key", "name: a\n? [x, y]\n: 1\n", "not valid YAML"),
    ("huge-key", "name: a\n" + "k" * 1000 + ": 1\n", ": unknown key"),
    ("huge-list-value", "name: a\nkernels: [" + ", ".join(["x"] * 5000) + "]\n", "kernels"),
    (
        "long-sweep",
        "name: a\nfleet: {count: [" + ", ".join(map(str, range(1, 2000))) + "]}\n",
        "fleet.count: List should have at most 64 items",
    ),
    ("many-keys", "name: a\n" + "".join(f"k{i}: {i}\n" for i in range(2000)), ": unknown key"),
    (
        "too-many-values",
        "name: a\n" + "".join(f"k{i}: {i}\n" for i in range(20_000)),
        "line 5000: not valid YAML: more than 10000 values",
    ),
    ("bad-syntax", "name: a\n  b: : c\n", "line 2: not valid YAML"),
    ("tab-indent", "name: a\nfleet:\n\tcount: 2\n", "not valid YAML"),
    # bounds
    ("repeats-huge", "name: a\nrepeats: 1000000000\n", "repeats: Input should be less than"),
    ("repeats-zero", "name: a\nrepeats: 0\n", "repeats: Input should be greater than"),
    (
        "matrix",
        "name: a\nrepeats: 100\nfleet: {count: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n",
        "repeats: 11 fleet sizes x 1 VMA counts x 1 KSM settings x 100 repeats x 1 kernels "
        "make 1100 trials",
    ),
    (
        "matrix-kernels",
        "name: a\n"
        + LABVM
        + "repeats: 10\nkernels: ["
        + ", ".join(f"k{i}" for i in range(16))
        + "]\nfleet: {count: [1, 2, 3, 4, 5, 6, 7]}\n",
        "more than 1000",
    ),
    (
        "timeout-inf",
        "name: a\nphases: {merge: {timeout_s: .inf}}\n",
        "phases.merge.timeout_s: Input should be a finite number",
    ),
    ("timeout-nan", "name: a\nphases: {boot: {timeout_s: .nan}}\n", "phases.boot.timeout_s"),
    (
        "timeout-subsecond",
        "name: a\nphases: {fill: {timeout_s: 0.5}}\n",
        "phases.fill.timeout_s: Input should be greater than or equal to 1",
    ),
    (
        "timeout-year",
        "name: a\nphases: {attribute: {timeout_s: 31536000}}\n",
        "phases.attribute.timeout_s: Input should be less than or equal to 86400",
    ),
    ("lab-boot-timeout", "name: a\nhost: {boot_timeout_s: -1}\n", "host.boot_timeout_s"),
    ("hold-inf", "name: a\nphases: {hold: {duration_s: .inf}}\n", "phases.hold.duration_s"),
    ("fleet-huge", "name: a\nfleet: {count: 1000000}\n", "fleet.count: Input should be less"),
    ("memory-huge", "name: a\nfleet: {memory_mib: 1000000000000}\n", "fleet.memory_mib"),
    ("vcpus-huge", "name: a\nfleet: {vcpus: 100000}\n", "fleet.vcpus"),
    ("lab-vcpus-huge", "name: a\nhost: {vcpus: 4096}\n", "host.vcpus"),
    ("lab-memory-huge", "name: a\nhost: {memory_mib: 99999999999}\n", "host.memory_mib"),
    ("copies-huge", "name: a\nhost_workload: {copies: 1000000}\n", "host_workload.copies"),
    ("workload-mib-huge", "name: a\nworkload: {mib: 2000000}\n", "workload.mib"),
    ("sampling-tiny", "name: a\nsampling: {interval_s: 0.000001}\n", "sampling.interval_s"),
    (
        "settle-scans",
        "name: a\nphases: {merge: {settle_scans: 1000000}}\n",
        "phases.merge.settle_scans",
    ),
    ("reserve-negative", "name: a\nhost_reserve_mib: -1\n", "host_reserve_mib"),
    (
        "migrate-repeats",
        "name: a\nphases: {migrate: {repeats: 100000}}\n",
        "phases.migrate.repeats",
    ),
    (
        "swap-huge",
        "name: a\nphases: {reclaim: {swap_mib: 10000000000}}\n",
        "phases.reclaim.swap_mib",
    ),
    # values that used to pass plan and fail later
    (
        "knob-zero",
        "name: a\nksm: {pages_to_scan: 0}\n",
        "ksm.pages_to_scan: expected an integer in [1, 1000000], got 0",
    ),
    ("knob-word", "name: a\nksm: {pages_to_scan: abc}\n", "ksm.pages_to_scan: expected an integer"),
    ("knob-negative", "name: a\nksm: {sleep_millisecs: -20}\n", "ksm.sleep_millisecs"),
    ("knob-bool", "name: a\nksm: {smart_scan: true}\n", "ksm.smart_scan"),
    ("knob-float", "name: a\nksm: {pages_to_scan: 1.5}\n", "ksm.pages_to_scan"),
    ("knob-numeric-string", "name: a\nksm: {pages_to_scan: '100'}\n", "ksm.pages_to_scan"),
    ("knob-max-sharing", "name: a\nksm: {max_page_sharing: 1}\n", "ksm.max_page_sharing"),
    ("knob-boolean-range", "name: a\nksm: {merge_across_nodes: 2}\n", "ksm.merge_across_nodes"),
    ("knob-mode", "name: a\nksm: {advisor_mode: fast}\n", "ksm.advisor_mode: expected one of"),
    ("knob-run", "name: a\nksm: {run: 1}\n", "ksm.run: run is set by densitylab"),
    ("knob-unknown", "name: a\nksm: {frobnicate: 1}\n", "ksm.frobnicate: unknown KSM knob"),
    (
        "knob-advisor-order",
        "name: a\nksm: {advisor_min_pages_to_scan: 9000, advisor_max_pages_to_scan: 10}\n",
        "ksm.advisor_min_pages_to_scan",
    ),
    ("count-true", "name: a\nfleet: {count: true}\n", "fleet.count: Input should be a valid"),
    ("count-list-true", "name: a\nfleet: {count: [1, true]}\n", "fleet.count.1"),
    ("count-string", "name: a\nfleet: {count: '4'}\n", "fleet.count"),
    ("repeats-true", "name: a\nrepeats: true\n", "repeats: Input should be a valid integer"),
    ("mib-true", "name: a\nworkload: {mib: true}\n", "workload.mib"),
    ("enabled-int", "name: a\nphases: {baseline: {enabled: 1}}\n", "phases.baseline.enabled"),
    ("seed-negative", "name: a\nseed: -1\n", "seed: Input should be greater than or equal to 0"),
    ("seed-u64", "name: a\nseed: 18446744073709551615\n", "seed: Input should be less than"),
    ("seed-workload", "name: a\nworkload: {seed: 36893488147419103232}\n", "workload.seed"),
    ("seed-true", "name: a\nseed: true\n", "seed"),
    (
        "fragment-region",
        "name: a\nworkload: {mib: 1, fragment_vmas: 300}\n",
        "workload.fragment_vmas: 300 VMAs need 300 pages; the 1 MiB region has 256",
    ),
    (
        "fragment-volatile",
        "name: a\nworkload: {mib: 4, dup: 0.5, volatile: 0.5, "
        "volatile_rate_pps: 100, fragment_vmas: 600}\n",
        "workload.fragment_vmas: 600 VMAs reach",
    ),
    (
        "fragment-host",
        "name: a\nhost_workload: {copies: 2, mib: 1, fragment_vmas: 2000}\n",
        "host_workload.fragment_vmas: 2000 VMAs need",
    ),
    (
        "fragment-host-sweep",
        "name: a\nhost_workload: {copies: 2, mib: 1, fragment_vmas: [10, 1000]}\n",
        "host_workload.fragment_vmas.1",
    ),
    (
        "fragment-max-map-count",
        "name: a\nhost_workload: {mib: 1024, fragment_vmas: 100000}\n",
        "host_workload.fragment_vmas",
    ),
    (
        "lab-memory-cells",
        "name: a\nhost: {kind: labvm, memory_mib: 4097, vcpus: 2, "
        "numa_cells: 2}\nkernels: ['7.3']\n",
        "host.memory_mib: 4097 does not split",
    ),
    # names, duplicates, repeated sweep entries
    ("name-newline", 'name: "a\\n"\n', "name: use letters"),
    ("name-escape", 'name: "\\e[31mred"\n', "got '\\x1b[31mred'"),
    ("name-bidi", 'name: "abc\\u202edef"\n', "\\u202e"),
    ("name-empty", "name: ''\n", "name: use letters"),
    ("name-long", "name: " + "a" * 100 + "\n", "name: use letters"),
    (
        "kernel-newline",
        "name: a\n" + LABVM + 'kernels: ["6.12", "7.3\\n"]\n',
        "kernels.1: use letters",
    ),
    ("kernel-local", "name: a\nkernels: ['6.12']\n", "kernels.0: a local host runs only"),
    ("kernel-running-lab", "name: a\n" + LABVM + "kernels: [running]\n", "kernels.0: a lab host"),
    ("kernels-empty", "name: a\n" + LABVM + "kernels: []\n", "kernels: name at least one"),
    ("kernel-not-string", "name: a\n" + LABVM + "kernels: [6.12]\n", "kernels.0"),
    ("duplicate-key", "name: a\nname: b\n", "line 2: not valid YAML: duplicate key 'name'"),
    (
        "duplicate-knob",
        "name: a\nksm:\n  pages_to_scan: 10\n  pages_to_scan: 20\n",
        "line 4: not valid YAML: duplicate key 'pages_to_scan' (first on line 3)",
    ),
    (
        "count-repeated",
        "name: a\nfleet: {count: [2, 2]}\n",
        "fleet.count.1: fleet size 2 is listed",
    ),
    (
        "vmas-repeated",
        "name: a\nhost_workload: {copies: 1, fragment_vmas: [100, 100]}\n",
        "host_workload.fragment_vmas.1",
    ),
    (
        "steps-repeated",
        "name: a\nphases: {reclaim: {v1_limit_steps_mib: [60, 60]}}\n",
        "phases.reclaim.v1_limit_steps_mib",
    ),
    # messages: keys and values with newlines and terminal escapes are escaped
    ("key-newline", 'name: a\n"evil\\nkey": 1\n', "evil\\nkey: unknown key"),
    ("key-escape", 'name: a\n"\\e]0;pwned\\a\\e[2J": 1\n', "\\x1b]0;pwned\\x07\\x1b[2J"),
    ("value-escape", 'name: a\nfleet: {accel: "\\e[2Jkvm"}\n', "fleet.accel"),
    ("knob-key-escape", 'name: a\nksm: {"\\e[2J": 1}\n', "ksm.\\x1b[2J: unknown KSM knob"),
    ("description-huge", "name: a\ndescription: " + "x" * 200_000 + "\n", "description"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "field"), [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES]
)
def test_plan_refuses_bad_spec(densitylab: Cli, cwd: Path, text: str, field: str) -> None:
    spec = cwd.parent / "spec.yaml"
    spec.write_text(text)
    check_line(densitylab("plan", str(spec)), f"{spec}: ", field)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("python-tag.yaml", "line 2: not valid YAML: could not determine a constructor"),
        (
            "duplicate-nested.yaml",
            "line 5: not valid YAML: duplicate key 'count' (first on line 3)",
        ),
        ("kernel-twice.yaml", "kernels.2: kernel 6.12 is listed twice"),
        ("lab-vcpus.yaml", "host.vcpus: 3 does not split into 2 equal NUMA cells"),
        ("fragment-too-many.yaml", "host_workload.fragment_vmas.2: 20000 VMAs need 20000 pages"),
    ],
)
def test_plan_refuses_recorded_specs(densitylab: Cli, cwd: Path, name: str, field: str) -> None:
    check_line(densitylab("plan", str(HOSTILE / name)), f"{HOSTILE / name}: ", field)
    assert not (cwd / "pwned").exists()


# The inputs that used to hang or fill memory: in a child that is killed after 5 s.
def _deep_flow(path: Path) -> None:
    path.write_text("name: a\nfleet: " + "[" * 100_000 + "]" * 100_000 + "\n")


def _deep_block(path: Path) -> None:
    path.write_text("name: a\n" + "".join(" " * i + "a:\n" for i in range(600)))


def _huge_value(path: Path) -> None:
    path.write_text("name: " + "x" * 200_000 + "\n")


def _oversized(path: Path) -> None:
    with open(path, "wb") as f:  # sparse: 2 GiB on paper, nothing on disk
        f.truncate(2 << 30)


def _long_int(path: Path) -> None:
    path.write_text("name: a\nseed: " + "9" * 100_000 + "\n")


def _nul(path: Path) -> None:
    path.write_bytes(b"name: a\x00\n")


def _latin1(path: Path) -> None:
    path.write_bytes(b"name: caf\xe9\n")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _link_to_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _alias_file(name: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes((HOSTILE / name).read_bytes())

    return write


SHAPE_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("billion-laughs", _alias_file("billion-laughs.yaml"), "line 4: not valid YAML: alias *a"),
    ("merge-bomb", _alias_file("merge-bomb.yaml"), "line 4: not valid YAML: alias *a0"),
    ("deep-flow", _deep_flow, "line 2: not valid YAML: nested deeper than 32 levels"),
    ("deep-block", _deep_block, "not valid YAML: nested deeper than 32 levels"),
    ("huge-value", _huge_value, "name: use letters"),
    ("oversized", _oversized, "bytes, more than 262144 allowed"),
    ("long-int", _long_int, "not valid YAML: Exceeds the limit"),
    ("nul-byte", _nul, "not valid YAML: unacceptable character #x0000"),
    ("not-utf8", _latin1, "not UTF-8 text (byte 9)"),
    ("fifo", _fifo, "not a regular file (a FIFO)"),
    ("directory", _directory, "not a regular file (a directory)"),
    ("dev-zero", _link_to_zero, "not a regular file (a device)"),
]


@pytest.mark.parametrize(
    ("make", "field"), [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES]
)
def test_plan_refuses_hostile_files_quickly(
    tmp_path: Path, cwd: Path, make: Callable[[Path], None], field: str
) -> None:
    spec = tmp_path / "spec.yaml"
    make(spec)
    line = check_line(subprocess_cli(cwd, "plan", str(spec)), f"{spec}: ", field)
    assert "x" * 100 not in line  # a huge value is shortened, not echoed


def test_dev_zero_itself_is_refused(cwd: Path) -> None:
    check_line(subprocess_cli(cwd, "plan", "/dev/zero"), "/dev/zero: ", "a device")


def test_a_file_name_is_escaped(densitylab: Cli, cwd: Path) -> None:
    spec = cwd.parent / "evil\n\x1b[2Jname.yaml"
    spec.write_text("name: a\nrepeats: 0\n")
    check_line(densitylab("plan", str(spec)), "", "evil\\n\\x1b[2Jname.yaml: repeats")


# --------------------------------------------------------------------------- run


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "case", ["knob-zero", "count-true", "kernel-newline", "duplicate-key", "matrix"]
)
def test_run_refuses_before_touching_the_host(
    densitylab: Cli, cwd: Path, host_tripwires: None, case: str
) -> None:
    text, field = next(c[1:] for c in SPEC_CASES if c[0] == case)
    spec = cwd.parent / "spec.yaml"
    spec.write_text(text)
    check_line(densitylab("run", str(spec)), f"{spec}: ", field)
    check_line(densitylab("run", str(HOSTILE / "billion-laughs.yaml")), str(HOSTILE), "alias")


@pytest.mark.timeout(10)
def test_run_refuses_bad_arguments_before_touching_the_host(
    densitylab: Cli, cwd: Path, host_tripwires: None
) -> None:
    smoke = str(REPO / "experiments" / "smoke.yaml")
    blocker = cwd.parent / "a-file"
    blocker.write_text("not a folder")
    check_line(densitylab("run", smoke, "--results", str(blocker)), "--results: ", "not a dir")
    check_line(
        densitylab("run", smoke, "--results", str(blocker / "sub")), "--results: ", "not a dir"
    )
    empty = cwd.parent / "empty-run"
    empty.mkdir()
    check_line(
        densitylab("run", smoke, "--resume", str(empty)), f"{empty}/manifest.json", "missing"
    )
    bad = cwd.parent / "bad-run"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"run_id": 7}')
    check_line(densitylab("run", smoke, "--resume", str(bad)), f"{bad}/manifest.json: ", "run_id")


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"), run_id="good")


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def manifest_of(good_run: Path) -> dict[str, object]:
    return json.loads((good_run / "manifest.json").read_text())


def with_trial(m: dict[str, object], **fields: object) -> dict[str, object]:
    trials = list(m["trials"])  # type: ignore[call-overload]
    return m | {"trials": [trials[0] | fields, *trials[1:]]}


# (case id, manifest.json text made from a good one, field the line must name)
MANIFEST_CASES: list[tuple[str, Callable[[dict[str, object]], str], str]] = [
    ("not-json", lambda m: "{not json", "cannot read manifest"),
    ("truncated", lambda m: json.dumps(m)[:100], "cannot read manifest"),
    ("array", lambda m: "[1, 2]", "expected a JSON object, got list"),
    ("empty-object", lambda m: "{}", "run_id: Field required"),
    (
        "no-trials",
        lambda m: json.dumps({k: v for k, v in m.items() if k != "trials"}),
        "trials: Field required",
    ),
    ("run-id-int", lambda m: json.dumps(m | {"run_id": 7}), "run_id: Input should be a valid"),
    ("run-id-slash", lambda m: json.dumps(m | {"run_id": "../../etc"}), "run_id: use letters"),
    ("spec-name-newline", lambda m: json.dumps(m | {"spec_name": "a\n"}), "spec_name"),
    ("trials-string", lambda m: json.dumps(m | {"trials": "all"}), "trials: Input should be"),
    ("trial-status-int", lambda m: json.dumps(with_trial(m, status=3)), "trials.0.status"),
    ("trial-no-id", lambda m: json.dumps(with_trial(m, trial_id=None)), "trials.0.trial_id"),
    (
        "trial-size-bool",
        lambda m: json.dumps(with_trial(m, fleet_size=True)),
        "trials.0.fleet_size",
    ),
    ("kernels-strings", lambda m: json.dumps(m | {"kernels": ["6.12"]}), "kernels.0"),
    (
        "kernel-escape",
        lambda m: json.dumps(m | {"kernels": [{"name": "\u001b[2J"}]}),
        "kernels.0.name",
    ),
    ("warnings-int", lambda m: json.dumps(m | {"warnings": [1]}), "warnings.0"),
    (
        "warning-escape",
        lambda m: json.dumps(m | {"warnings": ["\u001b]0;pwned\u0007"]}),
        "warnings.0: contains a control character",
    ),
    ("host-list", lambda m: json.dumps(m | {"host": [1]}), "host: Input should be"),
    (
        "host-ram-nan",
        lambda m: json.dumps(m | {"host": {"memory": {"value": float("nan")}}}),
        "cannot read manifest: NaN is not JSON",
    ),
    (
        "host-ram-negative",
        lambda m: json.dumps(m | {"host": {"mem_total_kib": -1}}),
        "host.mem_total_kib",
    ),
    (
        "host-ram-string",
        lambda m: json.dumps(m | {"host": {"memory": {"value": "lots"}}}),
        "host.memory.value",
    ),
    (
        "page-size-zero",
        lambda m: json.dumps(m | {"host": {"page_size_bytes": 0}}),
        "host.page_size_bytes",
    ),
    ("seed-string", lambda m: json.dumps(m | {"seed": "1"}), "seed"),
    ("versions-dict", lambda m: json.dumps(m | {"qemu_version": {"x": 1}}), "qemu_version"),
    ("combined", lambda m: json.dumps(m | {"combined_from": [m]}), "combined_from"),
    ("deep", lambda m: "[" * 100_000 + "]" * 100_000, "cannot read manifest"),
    ("deep-object", lambda m: json.dumps(m | {"spec": nested(70)}), "nested deeper than 64"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("make", "field"), [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES]
)
def test_report_and_compare_refuse_bad_manifest(
    densitylab: Cli,
    cwd: Path,
    good_run: Path,
    make: Callable[[dict[str, object]], str],
    field: str,
) -> None:
    run = cwd.parent / "bad"
    run.mkdir()
    (run / "manifest.json").write_text(make(manifest_of(good_run)))
    (run / "trials.parquet").write_bytes((good_run / "trials.parquet").read_bytes())
    where = f"{run / 'manifest.json'}: "
    check_line(densitylab("report", str(run)), where, field)
    check_line(densitylab("report", str(good_run), str(run)), where, field)
    check_line(densitylab("compare", str(good_run), str(run)), where, field)
    check_line(densitylab("compare", str(run), str(good_run)), where, field)


def _special_manifest(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def build(run: Path) -> None:
        run.mkdir()
        make(run / "manifest.json")

    return build


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda run: None, "no such run directory"),
        (lambda run: run.mkdir(), "manifest.json: missing"),
        (_special_manifest(os.mkfifo), "manifest.json: not a regular file (a FIFO)"),
        (_special_manifest(lambda p: p.symlink_to("/dev/zero")), "not a regular file (a device)"),
        (_special_manifest(lambda p: p.mkdir()), "not a regular file (a directory)"),
    ],
    ids=["absent", "no-manifest", "fifo", "dev-zero", "directory"],
)
def test_report_refuses_odd_run_directories_quickly(
    tmp_path: Path, cwd: Path, build: Callable[[Path], None], field: str
) -> None:
    run = tmp_path / "odd"
    build(run)
    check_line(subprocess_cli(cwd, "report", str(run)), str(run), field)
    check_line(subprocess_cli(cwd, "compare", str(run), str(run)), str(run), field)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "1e300", "abc"])
def test_report_refuses_bad_host_ram(densitylab: Cli, good_run: Path, value: str) -> None:
    check_line(densitylab("report", str(good_run), "--host-ram-gib", value), "", "--host-ram-gib")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--ksmd-cpu-max-pct", "0"),
        ("--ksmd-cpu-max-pct", "-5"),
        ("--ksmd-cpu-max-pct", "nan"),
        ("--ksmd-cpu-max-pct", "1e9"),
        ("--settle-max-s", "0"),
        ("--settle-max-s", "inf"),
        ("--reserve-mib", "-1"),
    ],
)
def test_report_refuses_bad_budget(densitylab: Cli, good_run: Path, flag: str, value: str) -> None:
    check_line(densitylab("report", str(good_run), flag, value), flag, "")


@pytest.mark.timeout(10)
def test_report_refuses_an_out_that_is_a_file(densitylab: Cli, cwd: Path, good_run: Path) -> None:
    blocker = cwd.parent / "index.html"
    blocker.write_text("mine")
    check_line(densitylab("report", str(good_run), "--out", str(blocker)), "--out: ", "not a dir")
    check_line(
        densitylab("report", str(good_run), "--out", str(blocker / "x")), "--out: ", "not a dir"
    )
    assert blocker.read_text() == "mine"


@pytest.mark.timeout(10)
def test_command_line_errors_are_one_line(densitylab: Cli, good_run: Path) -> None:
    check_line(densitylab("plan"), "", "Missing argument")
    check_line(densitylab("report"), "", "Missing argument")
    check_line(densitylab("compare", str(good_run)), "", "Missing argument")
    check_line(densitylab("run", "x.yaml", "--bogus"), "", "--bogus")
    check_line(densitylab("frobnicate"), "", "frobnicate")


@pytest.mark.timeout(60)
def test_default_report_folder_is_named_from_the_resolved_run(
    cwd: Path, good_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`report x/sub/..` used to write into reports/out/.. (= reports/) itself."""
    (good_run / "sub").mkdir(exist_ok=True)
    assert cli.main(["report", str(good_run / "sub" / "..")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (cwd / "reports").iterdir()) == ["out"]
    assert (cwd / "reports" / "out" / "good" / "index.html").is_file()


# --------------------------------------------------------------------------- mutations

MUTATIONS: list[object] = [
    0, -1, True, None, "abc", "a\n", "\x1b[2J", 1.5, float("inf"), float("nan"), 2**64,
    10**30, [], [2, 2], {}, {"a": 1}, "", "x" * 200, 0.0001, "running", ["6.12", "6.12"],
]  # fmt: skip


def key_paths(d: dict[str, object], pre: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in d.items():
        out.append((*pre, k))
        if isinstance(v, dict):
            out += key_paths(v, (*pre, k))
    return out


@pytest.mark.timeout(60)
def test_mutated_shipped_specs_never_crash() -> None:
    """Any value anywhere in a shipped spec: accepted and planned, or one UsageError
    line; never another exception, a raw control character, or "(top level)"."""
    import copy
    import random

    import yaml

    from orchestrator import plan
    from orchestrator.errors import UsageError
    from orchestrator.spec import load_spec_text

    rng = random.Random(12)
    specs = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "experiments").glob("*.yaml"))]
    refused = 0
    for _ in range(400):
        raw = copy.deepcopy(rng.choice(specs))
        for _ in range(rng.randint(1, 3)):
            *parents, last = rng.choice(key_paths(raw))
            d = raw
            for k in parents:
                d = d[k]
            d[last] = copy.deepcopy(rng.choice(MUTATIONS))
        try:
            spec, _ = load_spec_text(yaml.safe_dump(raw), "m.yaml")
            for t in plan.expand(spec):
                assert plan.estimate_s(spec, t) > 0
        except UsageError as e:
            refused += 1
            msg = str(e)
            assert msg.startswith("m.yaml: ") and msg.isprintable(), msg
            assert "(top level)" not in msg and len(msg) < 400, msg
    assert refused > 300  # the mutations are hostile: nearly all must be refused
