"""`densitylab reproduce`: what it reads from a recorded run, before any host is touched.

tests/data/runs/smoke/manifest.json is the manifest of a real smoke run on this lab
(TCG guests, kernel 6.18, QEMU 7.2, libvirt 9.0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cli, reproduce
from orchestrator.errors import UsageError
from orchestrator.results import analysis
from orchestrator.spec import load_spec
from tests.conftest import DATA, REPO
from tests.synthetic import Synthetic, make_run

SMOKE = DATA / "runs" / "smoke"


def recorded() -> dict[str, Any]:
    return dict(json.loads((SMOKE / "manifest.json").read_text()))


def run_dir(tmp_path: Path, **changes: Any) -> Path:
    """A copy of the recorded smoke run's manifest with some fields changed (None: removed)."""
    m = recorded()
    for k, v in changes.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    d = tmp_path / m["run_id"]
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.fixture(autouse=True)
def at_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # spec_path is recorded relative to the repository


def test_every_recorded_version_is_named():
    v = reproduce.versions_of(recorded())
    assert v["densitylab commit"] == "7e30265da6f405022d42a8ae98feb6748a6c3c43"
    assert v["host kernel"] == "6.18.44-fc-v1045"
    assert (v["QEMU"], v["libvirt"]) == ("7.2.22", "9.0.0")
    assert len(v["guest image kernel sha256"]) == len(v["guest image initrd sha256"]) == 64
    assert v["kernel running release"] == "6.18.44-fc-v1045"


def test_a_warning_for_each_version_that_differs_and_none_for_the_same():
    then = reproduce.versions_of(recorded())
    assert reproduce.drift_warnings(then, dict(then)) == []
    here = then | {"QEMU": "8.2.2", "guest image initrd sha256": "0" * 64}
    here.pop("libvirt")
    warnings = reproduce.drift_warnings(then | {"densitylab commit": None}, here)
    assert warnings == [
        "densitylab commit: not recorded in the run; cannot tell whether it differs",
        "QEMU: run had 7.2.22, here 8.2.2",
        "libvirt: run had 9.0.0, not found here",
        f"guest image initrd sha256: run had {then['guest image initrd sha256']}, here {'0' * 64}",
    ]


def test_the_recorded_spec_file_is_used_when_its_bytes_match(tmp_path: Path):
    rep = reproduce.plan_reproduction(run_dir(tmp_path))
    assert rep.recorded_file == Path("experiments/smoke.yaml")
    assert rep.spec == load_spec(Path("experiments/smoke.yaml"))[0]
    with reproduce.spec_file(rep) as path:
        assert path == Path("experiments/smoke.yaml")


def test_a_changed_spec_file_is_rebuilt_from_the_manifest(tmp_path: Path):
    rep = reproduce.plan_reproduction(run_dir(tmp_path, spec_sha256="ab" * 32))
    assert rep.recorded_file is None and "rebuilt" in rep.spec_source
    assert rep.spec == load_spec(Path("experiments/smoke.yaml"))[0]  # the same model
    with reproduce.spec_file(rep) as path:
        assert load_spec(path)[0] == rep.spec
    assert not path.exists()  # the temporary copy is gone; the new run keeps the text


def test_recorded_seeds_are_written_into_a_spec_that_left_them_to_defaults(tmp_path: Path):
    spec = {k: v for k, v in recorded()["spec"].items() if k != "seed"}
    d = run_dir(
        tmp_path, spec=spec, spec_path=None, seed=7, workload_seed=11, host_workload_seed=12
    )
    rep = reproduce.plan_reproduction(d)
    assert (rep.spec.seed, rep.spec.workload_seed, rep.spec.host_workload_seed) == (7, 11, 12)


def test_seeds_this_version_cannot_give_are_refused_naming_the_field(tmp_path: Path):
    d = run_dir(tmp_path, spec_path=None, host_workload_seed=5)
    with pytest.raises(UsageError, match=r"manifest.json: host_workload_seed: the run used 5"):
        reproduce.plan_reproduction(d)


def test_a_run_without_its_spec_is_refused_naming_the_field(tmp_path: Path):
    with pytest.raises(UsageError, match=r"manifest.json: spec: not recorded"):
        reproduce.plan_reproduction(run_dir(tmp_path, spec=None, spec_path=None))


def test_an_invalid_recorded_spec_names_the_manifest_and_key(tmp_path: Path):
    spec = recorded()["spec"] | {"fleet": {"count": 0}}
    with pytest.raises(UsageError, match=r"manifest.json: spec: fleet.count"):
        reproduce.plan_reproduction(run_dir(tmp_path, spec=spec, spec_path=None))


def test_cli_refuses_a_missing_run_in_one_line(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["reproduce", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["densitylab: /nonexistent/run: no such run directory"]


def test_cli_refuses_a_results_path_that_is_a_file(tmp_path: Path, capsys):
    d = run_dir(tmp_path)
    (tmp_path / "file").write_text("")
    assert cli.main(["reproduce", str(d), "--results", str(tmp_path / "file")]) == 2
    assert "--results" in capsys.readouterr().err


def _runs(tmp_path: Path, workload_b: int) -> tuple[Path, Path]:
    # 6 repeats a side: enough for Mann-Whitney to call a difference after Holm's
    # correction over the 14 metrics (3 a side never can: its smallest p is 0.1).
    base: dict[str, Any] = dict(
        kernels=("7.3",), old_kernels=(), fleet_sizes=(4,), repeats=6, failed_trials=0
    )
    base["latency_samples"] = 100
    a = make_run(tmp_path / "a", Synthetic(run_id="syn-a", seed=1, **base))
    b = make_run(tmp_path / "b", Synthetic(run_id="syn-b", seed=2, workload_mib=workload_b, **base))
    return a, b


@pytest.mark.parametrize(("workload_b", "said"), [(160, "no significant"), (100, "significant")])
def test_the_saving_verdict_calls_a_difference_only_when_there_is_one(
    tmp_path: Path, workload_b: int, said: str
):
    a, b = _runs(tmp_path, workload_b)
    lines = reproduce.saving_verdict(analysis.compare_runs(a, b).metrics)
    assert len(lines) == len(reproduce.SAVING_METRICS)
    for line in lines:
        assert line.split(": ")[-1].startswith(said), line
    if workload_b == 100:  # 100 MiB of fill instead of 160: B saves ~0.62 of A
        assert all("(B lower)" in line for line in lines)


def test_the_new_run_records_what_it_reproduces(tmp_path: Path):
    src = run_dir(tmp_path, spec_sha256="ab" * 32)
    new = make_run(tmp_path / "new", Synthetic(run_id="syn-new"))
    rep = reproduce.plan_reproduction(src)
    with reproduce.spec_file(rep) as path:
        reproduce.mark_reproduction(rep, new, path)
    m = json.loads((new / "manifest.json").read_text())
    assert m["reproduces"]["run_id"] == recorded()["run_id"]
    kept = Path(m["spec_path"])
    assert kept == new / reproduce.REPRODUCED_SPEC and load_spec(kept)[0] == rep.spec
    shutil.rmtree(new)
