"""The host agent package: stdlib only, one command runner, the CLI lab hosts drive, and
the one-file zipapp it ships as (built and run here for real)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from orchestrator import agentship, dlfill, images
from orchestrator.agent import cli, cmd

PACKAGE = agentship.AGENT_PACKAGE
DATA = Path(__file__).resolve().parents[1] / "data"


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(level, module, names) of every import statement in a file, nested ones too."""
    out: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(0, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or "", [a.name for a in node.names]))
    return out


def test_the_agent_imports_nothing_but_the_stdlib_and_itself() -> None:
    parts = {p.stem for p in PACKAGE.glob("*.py")}
    bad = []
    for path in sorted(PACKAGE.glob("*.py")):
        for level, module, names in imports_of(path):
            if level == 0:
                top = module.split(".")[0]
                if top != "__future__" and top not in sys.stdlib_module_names:
                    bad.append(f"{path.name}: import {module}")
            elif level > 1:
                bad.append(f"{path.name}: import reaches above the package ({'.' * level}{module})")
            else:
                # `from . import ksm` or `from .ksm import x`: must name a part of the package
                wanted = [module] if module else [n for n in names if n != "__doc__"]
                bad += [f"{path.name}: no part {w!r}" for w in wanted if w not in parts]
    assert not bad, bad
    assert len(parts) >= 8  # the split happened: not one file again


def test_the_import_walk_catches_a_third_party_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import yaml\n    from orchestrator import proc\n")
    tops = {m.split(".")[0] for _, m, _ in imports_of(bad)}
    assert tops == {"yaml", "orchestrator"}
    assert not tops & set(sys.stdlib_module_names)


# ---------------------------------------------------------------- the one command runner


def test_cmd_run_returns_the_output_of_a_command_that_succeeds() -> None:
    assert cmd.run(["sh", "-c", "echo hi"], timeout_s=10).stdout == "hi\n"


def test_cmd_run_raises_with_argv_rc_and_the_tail_of_stderr() -> None:
    argv = ["sh", "-c", "echo early >&2; echo the reason >&2; exit 3"]
    with pytest.raises(cmd.AgentCommandError) as e:
        cmd.run(argv, timeout_s=10)
    assert (e.value.argv, e.value.rc) == (argv, 3)
    assert e.value.stderr_tail.endswith("the reason")
    assert "rc 3" in str(e.value) and "the reason" in str(e.value)


def test_cmd_run_keeps_only_the_tail_of_a_long_stderr() -> None:
    with pytest.raises(cmd.AgentCommandError) as e:
        cmd.run(["sh", "-c", "seq 1 5000 >&2; exit 1"], timeout_s=10)
    assert e.value.stderr_tail.endswith("5000") and len(e.value.stderr_tail) < 420


def test_cmd_run_names_a_missing_program_rc_127() -> None:
    with pytest.raises(cmd.AgentCommandError) as e:
        cmd.run(["/nonexistent/densitylab-tool", "x"], timeout_s=10)
    assert e.value.rc == 127 and "not found" in str(e.value)


def test_cmd_run_kills_a_command_past_its_timeout() -> None:
    with pytest.raises(cmd.AgentCommandError) as e:
        cmd.run(["sleep", "30"], timeout_s=0.3)
    assert e.value.rc is None and "timed out" in str(e.value)


def test_cmd_run_without_check_returns_the_failure() -> None:
    assert cmd.run(["false"], timeout_s=10, check=False).returncode == 1


# ---------------------------------------------------------------- the command line


def cli_shape(p: argparse.ArgumentParser) -> dict[str, list[list[object]]]:
    """Subcommand -> its arguments (flags, nargs, default, required, choices, action)."""
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: sorted(
            [
                ",".join(a.option_strings) or a.dest,
                a.nargs if a.nargs is not None else "",
                str(a.default),
                bool(a.required),
                list(a.choices or []),
                type(a).__name__,
            ]
            for a in sp._actions
            if a.dest != "help"
        )
        for name, sp in sub.choices.items()
    }


def test_every_subcommand_keeps_the_flags_lab_hosts_drive() -> None:
    """tests/data/agent_cli.json was recorded from the one-file agent before the split:
    every subcommand, flag, default and choice it had is still there, in its order; new
    choices may be added (a new latency method) and new subcommands after the old ones
    (`hold`, `clean`), none taken away. A flag may widen from one value to a repeatable
    one (move-pages --pid, reclaim --cgroup): the old single use parses as before. New
    flags must be optional (the stopping rule's --tight-*): an old call still parses."""
    recorded = json.loads((DATA / "agent_cli.json").read_text())
    now = cli_shape(cli.parser())
    assert list(now)[: len(recorded)] == list(recorded)
    assert {"hold", "clean"} <= set(now)
    widened = {("_StoreAction", "_AppendAction")}
    for name, args in recorded.items():
        by_flag = {a[0]: a for a in now[name]}
        assert not [a for a in now[name] if a[3] and a[0] not in {o[0] for o in args}], name
        for old in args:
            new = by_flag[old[0]]
            assert new[:4] == old[:4], (name, old, new)
            assert new[5] == old[5] or (old[5], new[5]) in widened, (name, old, new)
            assert set(old[4]) <= set(new[4]), (name, old, new)  # type: ignore[arg-type]


def test_move_pages_and_reclaim_take_one_or_several_targets() -> None:
    p = cli.parser()
    assert p.parse_args(["move-pages", "--pid", "7", "--pages", "5", "--node", "1"]).pid == [7]
    two = p.parse_args(["reclaim", "--cgroup", "a", "--cgroup", "b", "--mib", "8", "--json"])
    assert two.cgroup == ["a", "b"]


def test_the_dispatch_table_is_the_parser() -> None:
    assert list(cli_shape(cli.parser())) == list(cli.COMMANDS)


# ---------------------------------------------------------------- the zipapp


def pythons() -> list[str]:
    """This Python and the system's python3 (Debian's, the one lab machines have)."""
    found = [sys.executable]
    system = shutil.which("python3", path="/usr/bin")
    if system and os.path.realpath(system) != os.path.realpath(sys.executable):
        found.append(system)
    return found


def test_the_zipapp_is_built_once_per_content_and_atomically(tmp_path: Path) -> None:
    pkg = tmp_path / "agent"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    first = agentship.agent_zipapp(tmp_path / "cache", pkg)
    assert agentship.agent_zipapp(tmp_path / "cache", pkg) == first
    (pkg / "fs.py").write_text((pkg / "fs.py").read_text() + "\n# changed\n")
    second = agentship.agent_zipapp(tmp_path / "cache", pkg)
    assert second != first and second.is_file() and first.is_file()
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".pyz"]
    assert leftovers == []  # no temp build folder left behind


@pytest.mark.parametrize("python", pythons())
def test_the_zipapp_runs_its_subcommands_under_python(python: str, tmp_path: Path) -> None:
    pyz = agentship.agent_zipapp(tmp_path / "cache")
    # The archive alone, from another folder, with no path to this checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    shipped = tmp_path / "opt" / "agent.pyz"
    shipped.parent.mkdir()
    shutil.copy(pyz, shipped)

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-I", str(shipped), *args],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
        )  # fmt: skip

    version = subprocess.run([python, "--version"], capture_output=True, text=True).stdout
    print(f"{python}: {version.strip()}")
    assert int(agent("now").stdout) > 0
    out = tmp_path / "s.jsonl"
    cp = agent("sample", "--interval-s", "0.1", "--stop-after-s", "0.25", "--out", str(out))
    assert cp.returncode == 0, cp.stderr
    samples = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(samples) >= 2 and all("ts_ns" in s and "vmstat" in s for s in samples)
    bad = agent("ksm-restore", "--saved", str(tmp_path / "absent.json"))
    assert bad.returncode == 1 and bad.stderr.startswith("hostagent: ")
    assert agent("no-such-subcommand").returncode == 2


def test_move_pages_reports_one_window_per_process_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two real dlfill processes in one call: a line each, in the order given, with the
    pid and a window on this clock (node 0: pages already there on a one-node host)."""
    procs, _ = start_fills(tmp_path, 2)
    try:
        before = time.monotonic_ns()
        pids = [str(p.pid) for p in procs]
        argv = ["move-pages", "--pid", pids[1], "--pid", pids[0], "--pages", "16", "--node", "0"]
        assert cli.main(argv) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [x["pid"] for x in lines] == [procs[1].pid, procs[0].pid]
    for x in lines:
        assert before <= x["start_ns"] <= x["end_ns"] <= time.monotonic_ns()
        assert x["requested"] == 16 and x["moved"] + x["already"] + x["failed"] == 16


def start_fills(tmp_path: Path, count: int) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """`count` real dlfill processes holding 2 MiB each, filled."""
    fill = images.host_dlfill()
    procs, outs = [], []
    for i in range(count):
        out = tmp_path / f"fill-{i}.out"
        argv = [str(fill), "--mib", "2", "--dup", "1", "--seed", "3", "--instance", str(i)]
        with out.open("w") as f:
            procs.append(subprocess.Popen([*argv, "--mergeable", "--hold"], stdout=f))
        outs.append(out)
    for out in outs:
        deadline = time.monotonic() + 30
        while dlfill.done_record(out.read_text()) is None:
            assert time.monotonic() < deadline, "dlfill did not fill"
            time.sleep(0.05)
    return procs, outs


def test_verify_signals_every_workload_and_returns_its_new_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator import integrity

    procs, outs = start_fills(tmp_path, 2)
    try:
        argv = [
            "verify",
            *[f"--proc=w{i}={p.pid}:{o}" for i, (p, o) in enumerate(zip(procs, outs, strict=True))],
        ]
        for seq in (1, 2):  # a second request waits for a new line, not the old one
            assert cli.main(argv) == 0
            answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
            got = [integrity.parse_verified(a["line"], a["workload"]) for a in answers]
            assert [v.workload for v in got] == ["w0", "w1"]
            assert all(v.pages == 512 and v.mismatches == 0 and v.seq == seq for v in got)
        procs[1].kill()
        procs[1].wait()
        assert cli.main(argv) == 1
        assert "w1 (pid" in capsys.readouterr().err
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("python", pythons())
def test_precompile_makes_the_zipapp_import_bytecode_and_keeps_it_working(
    python: str, tmp_path: Path
) -> None:
    """`precompile` rewrites the archive with this Python's .pyc beside each module:
    imports then come from the bytecode (the loader says which), the subcommands still
    run, and a .pyc of another Python (bad magic) is passed over for the source."""
    shipped = tmp_path / "agent.pyz"
    shutil.copy(agentship.agent_zipapp(tmp_path / "cache"), shipped)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, "-I", *args], capture_output=True, text=True, env=env)

    which = (
        "import sys; sys.path.insert(0, sys.argv[1]); import densitylab_agent.enough as m; "
        "print(m.__spec__.loader.get_filename('densitylab_agent.enough'))"
    )
    assert run("-c", which, str(shipped)).stdout.strip().endswith("enough.py")
    cp = run(str(shipped), "precompile", "--archive", str(shipped))
    assert cp.returncode == 0 and "modules compiled" in cp.stdout, cp.stderr
    with zipfile.ZipFile(shipped) as z:
        names = set(z.namelist())
    assert "densitylab_agent/enough.pyc" in names and "__main__.pyc" not in names
    assert run("-c", which, str(shipped)).stdout.strip().endswith("enough.pyc")
    assert int(run(str(shipped), "now").stdout) > 0
    # Another interpreter's bytecode (here: a corrupted magic number) falls back to source.
    with zipfile.ZipFile(shipped) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries["densitylab_agent/enough.pyc"] = (
        b"\0\0\0\0" + entries["densitylab_agent/enough.pyc"][4:]
    )
    with zipfile.ZipFile(shipped, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    assert run("-c", which, str(shipped)).stdout.strip().endswith("enough.py")
    assert int(run(str(shipped), "now").stdout) > 0


def test_one_stop_call_stops_every_process_then_removes_their_cgroups(tmp_path: Path) -> None:
    """Real processes spawned into a real memory cgroup of ours, stopped in one call."""
    name = f"densitylab-test-stop-{os.getpid()}"
    pidfiles = [tmp_path / f"{i}.pid" for i in range(2)]
    for pf in pidfiles:
        argv = ["spawn", "--out", str(tmp_path / "o"), "--pidfile", str(pf), "--cgroup", name]
        assert cli.main([*argv, "--", "/bin/sleep", "600"]) == 0
    pids = [int(pf.read_text()) for pf in pidfiles]
    cg = cli.our_cgroup(name)
    assert all(Path(f"/proc/{p}").exists() for p in pids)
    try:
        argv = ["stop", *[f"--pidfile={pf}" for pf in pidfiles], f"--cgroup={name}"]
        assert cli.main([*argv, "--grace-s", "5"]) == 0
        assert not any(Path(f"/proc/{p}").exists() for p in pids) and not cg.exists()
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, 9)
        with contextlib.suppress(OSError):
            cg.rmdir()
