"""One module owns each external system (STYLE.md, convention 1): walk every module's
AST and fail with file:line and the rule for any import of an external system, or any
write under /sys, outside the modules that own it.

To give a new module an external system (a future inventory module running
ansible_runner, the host agent's split into a package), add its path to the rule's
`owners` and say why in the rule; the table is the whole policy.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = "orchestrator"


@dataclass(frozen=True)
class Rule:
    system: str
    modules: tuple[str, ...]  # top-level import names (a.b counts as a)
    owners: tuple[str, ...]  # paths relative to the repository
    why: str


RULES = (
    Rule(
        "libvirt",
        ("libvirt", "libvirt_qemu", "libvirt_lxc"),
        ("orchestrator/fleet.py",),
        "only the fleet module talks to libvirt",
    ),
    Rule(
        "ansible_runner",
        ("ansible_runner",),
        ("orchestrator/workload.py", "orchestrator/inventory.py"),
        "only the workload driver (and the inventory it runs against) drives Ansible",
    ),
    Rule(
        "subprocess",
        ("subprocess",),
        # proc.py is the command runner. The host agent ships alone (a stdlib-only
        # zipapp), so its cmd module is its own.
        ("orchestrator/proc.py", "orchestrator/agent/cmd.py"),
        "external commands go through orchestrator/proc.py (argv lists, timeouts, errors)",
    ),
    Rule(
        "seaborn/matplotlib",
        ("seaborn", "matplotlib"),
        ("orchestrator/report.py", "orchestrator/report/figures.py"),
        "only the report's figure module draws",
    ),
)
SYS_RULE = Rule(
    "writes under /sys",
    (),
    (
        "orchestrator/agent/ksm.py",
        "orchestrator/agent/memory.py",  # zram, cgroups, memory blocks
        "orchestrator/agent/leftovers.py",  # undoes those two after a kill -9
    ),
    "only the host agent's KSM and memory code writes KSM knobs, zram, cgroups",
)
# The host agent runs alone (on a lab machine over Ansible, inside a lab-host VM): it
# imports the standard library and its own package's modules (relative imports), nothing
# else, not even the orchestrator. (The orchestrator may import it.)
AGENT = ("orchestrator/agent/",)
WRITE_CALLS = frozenset({"write_text", "write_bytes", "write", "writelines"})


def modules(root: Path) -> list[Path]:
    return sorted(p for p in (root / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


def imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, top-level module name) for every import, static or by importlib."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif (
            isinstance(node, ast.Call)
            and _call_name(node) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value.split(".")[0]


def _call_name(node: ast.Call) -> str | None:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _opens_for_writing(node: ast.Call) -> bool:
    if _call_name(node) not in ("open", "fdopen"):
        return False
    mode = node.args[1] if len(node.args) > 1 else None
    mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
    return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")


def sys_writes(tree: ast.AST) -> list[int]:
    """Lines naming a path under /sys, in a module that also writes files.

    A module is judged whole: which path a write reaches is not known without running
    it, but a module that names /sys and writes nothing cannot write there, and one that
    writes and never names /sys would need the path handed in by an owner."""
    sys_lines, writes = [], False
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value == "/sys" or node.value.startswith("/sys/"):
                sys_lines.append(node.lineno)
        elif isinstance(node, ast.Call):
            writes = writes or _call_name(node) in WRITE_CALLS or _opens_for_writing(node)
    return sys_lines if writes else []


def violations(root: Path) -> list[str]:
    """Every crossing of a boundary under root/orchestrator, as 'file:line: rule'."""
    out = []
    for path in modules(root):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for line, name in imported(tree):
            for rule in RULES:
                if name in rule.modules and rel not in rule.owners:
                    out.append(f"{rel}:{line}: imports {name}: {rule.why}")
        if rel not in SYS_RULE.owners:
            out += [
                f"{rel}:{line}: names /sys and writes: {SYS_RULE.why}" for line in sys_writes(tree)
            ]
    return out


def agent_violations(root: Path) -> list[str]:
    out = []
    for path in modules(root):
        rel = path.relative_to(root).as_posix()
        if not rel.startswith(AGENT):
            continue
        for line, name in imported(ast.parse(path.read_text(encoding="utf-8"))):
            if name not in sys.stdlib_module_names and name != "__future__":
                out.append(f"{rel}:{line}: imports {name}: the host agent is stdlib-only")
    return out


def test_the_host_agent_imports_only_the_standard_library():
    found = agent_violations(REPO)
    assert not found, "\n".join(found)


def test_every_external_system_stays_in_its_module():
    found = violations(REPO)
    assert not found, "\n".join(found)


def test_every_owner_named_in_the_table_is_a_module_or_a_planned_one():
    # A typo in the table would silently allow nothing; planned modules are listed here.
    planned = {"orchestrator/report/figures.py"}
    for rule in (*RULES, SYS_RULE):
        for owner in rule.owners:
            assert (REPO / owner).is_file() or owner in planned, owner


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import libvirt\n", "1: imports libvirt"),
        ("import os\nfrom libvirt_qemu import q\n", "2: imports libvirt_qemu"),
        ("if 1:\n    import ansible_runner.config\n", "2: imports ansible_runner"),
        ("def f():\n    import subprocess\n", "2: imports subprocess"),
        ("import importlib\nimportlib.import_module('seaborn')\n", "2: imports seaborn"),
        ("from matplotlib import pyplot\n", "1: imports matplotlib"),
        (
            "from pathlib import Path\nK = Path('/sys/kernel/mm/ksm')\n"
            "(K / 'run').write_text('1')\n",
            "2: names /sys and writes",
        ),
        ("with open('/sys/block/zram0/reset', 'w') as f:\n    pass\n", "1: names /sys"),
    ],
)
def test_a_crossing_is_named_with_file_line_and_rule(tmp_path: Path, source: str, expected: str):
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "bad.py").write_text(source)
    (found,) = violations(tmp_path)
    assert found.startswith(f"orchestrator/bad.py:{expected}"), found


def test_reading_sys_or_writing_elsewhere_is_no_crossing(tmp_path: Path):
    root = tmp_path
    (root / PACKAGE).mkdir()
    (root / PACKAGE / "ok.py").write_text(
        "from pathlib import Path\n"
        "n = Path('/sys/devices/system/node').read_text()\n"
        "Path('/tmp/x').with_suffix('.txt')\n"
        "import json\nfrom .proc import run\n"
    )
    (root / PACKAGE / "w.py").write_text("open('/var/tmp/x', 'w').write('1')\n")
    assert violations(root) == []


def test_the_agent_may_import_itself_and_the_stdlib_only(tmp_path: Path):
    agent = tmp_path / PACKAGE / "agent"
    agent.mkdir(parents=True)
    (agent / "ksm.py").write_text("import json\nfrom . import fs\nfrom .fs import read_text\n")
    (agent / "cmd.py").write_text("import subprocess\nfrom orchestrator import proc\n")
    (agent / "probe.py").write_text("import os\nimport yaml\n")
    assert agent_violations(tmp_path) == [
        "orchestrator/agent/cmd.py:2: imports orchestrator: the host agent is stdlib-only",
        "orchestrator/agent/probe.py:2: imports yaml: the host agent is stdlib-only",
    ]
