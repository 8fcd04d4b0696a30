"""The host agent as one file: a zipapp of orchestrator/agent, for machines that run it.

A lab host (and, later, a lab machine over SSH) gets one file, `python3 agent.pyz
SUBCOMMAND`, which needs nothing but the stdlib of Python >= 3.11. Inside the archive the
package is named `densitylab_agent`; its parts import each other relatively, so the very
same files run here as `orchestrator.agent`. The archive is built from the package's
sources and cached under their content hash, so a changed agent can never be shipped
stale and an unchanged one is built once.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipapp
from pathlib import Path

AGENT_PACKAGE = Path(__file__).resolve().parent / "agent"
# Where the agent lives on a machine it is shipped to.
REMOTE_AGENT_PATH = "/opt/densitylab/agent.pyz"
PYZ_PACKAGE = "densitylab_agent"
PYZ_MAIN = f"import sys\n\nfrom {PYZ_PACKAGE}.cli import main\n\nsys.exit(main())\n"
CACHE_ENV = "DENSITYLAB_AGENT_CACHE"


def agent_sources(package: Path = AGENT_PACKAGE) -> dict[str, bytes]:
    """File name -> content of every module of the agent package (sorted by name)."""
    return {p.name: p.read_bytes() for p in sorted(package.glob("*.py"))}


def content_hash(sources: dict[str, bytes]) -> str:
    """16 hex digits over the names and contents of the sources and the entry point."""
    h = hashlib.sha256(PYZ_MAIN.encode())
    for name, data in sources.items():
        h.update(f"\0{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """$DENSITYLAB_AGENT_CACHE, else $XDG_CACHE_HOME/densitylab/agent (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "densitylab" / "agent"


def agent_zipapp(cache_dir: Path | None = None, package: Path = AGENT_PACKAGE) -> Path:
    """The agent zipapp for the package's current sources, built if not cached yet.

    Written to a temp file in the cache folder and renamed into place, so a reader (or
    a concurrent build from another process) never sees half an archive. Raises
    OSError when the cache folder cannot be written."""
    sources = agent_sources(package)
    cache = cache_dir or default_cache_dir()
    target = cache / f"agent-{content_hash(sources)}.pyz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        src = Path(tmp) / "src"
        (src / PYZ_PACKAGE).mkdir(parents=True)
        for name, data in sources.items():
            (src / PYZ_PACKAGE / name).write_bytes(data)
        (src / "__main__.py").write_text(PYZ_MAIN)
        built = Path(tmp) / "agent.pyz"
        zipapp.create_archive(src, built, compressed=True)
        os.replace(built, target)
    return target


def local_agent_argv() -> list[str]:
    """How this machine runs the agent: the same zipapp that is shipped, under this
    Python (so a local trial exercises the very file a lab host gets)."""
    return [sys.executable, str(agent_zipapp())]
