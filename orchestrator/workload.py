"""In-guest workloads through ansible-runner: the only module that imports ansible_runner.

Each play runs with its own private data directory inside the run directory, so the
artifacts (job_events, stdout, status, rc) stay with the run. Per-guest results are
read from the job events, never scraped from text.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ansible_runner
import yaml

from orchestrator import dlfill, integrity
from orchestrator.errors import DensitylabError
from orchestrator.spec import Workload

log = logging.getLogger(__name__)

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
# ansible-playbook must be the venv's (it imports libvirt for the connection plugin).
VENV_BIN = str(Path(sys.executable).parent)

EventCallback = Callable[[str, str], None]  # (host, event name)


class PlayError(DensitylabError):
    """A play did not end successfully on every host."""

    def __init__(
        self,
        play: str,
        status: str,
        rc: int | None,
        failures: Mapping[str, str],
        events: Sequence[Mapping[str, Any]] = (),
    ):
        self.play = play
        self.status = status
        self.rc = rc
        self.failures = dict(failures)
        self.events = list(events)  # what the play did before it failed
        detail = "; ".join(f"{h}: {m}" for h, m in sorted(failures.items())) or "no host detail"
        super().__init__(f"play {play} {status} (rc {rc}): {detail}")


@dataclass(frozen=True)
class FillResult:
    """What one guest's dlfill reported when its fill was done."""

    guest: str
    fill_s: float
    dup_pages: int
    zero_pages: int
    unique_pages: int
    volatile_pages: int
    vmas: int
    pages: int = 0
    dlfill_pid: int | None = None  # in the guest (pagecount follows its pages)
    region_addr: int | None = None  # guest virtual address of the region


def inventory(guests: Sequence[str], uri: str) -> dict[str, Any]:
    """An inventory reaching each guest through its guest agent (no network, no Python)."""
    return {
        "all": {
            "hosts": {g: {"instance": i} for i, g in enumerate(guests)},
            "vars": {
                "ansible_connection": "community.libvirt.libvirt_qemu",
                "ansible_libvirt_uri": uri,
            },
        }
    }


def workload_vars(w: Workload, seed: int, fill_timeout_s: float) -> dict[str, Any]:
    return {
        "mib": w.mib,
        "dup": w.dup,
        "zero": w.zero,
        "unique": w.unique,
        "volatile": w.volatile,
        "volatile_rate_pps": w.volatile_rate_pps,
        "fragment_vmas": w.fragment_vmas,
        "pattern_flag": "--one-content" if w.pattern == "one-content" else "",
        "seed": seed,
        "fill_timeout_s": math.ceil(fill_timeout_s),  # whole seconds, never fewer
    }


def run_play(
    play: str,
    guests: Sequence[str],
    data_dir: Path,
    *,
    uri: str,
    extravars: Mapping[str, Any],
    timeout_s: float,
    on_event: EventCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Run playbooks/<play>.yml (or the playbook file `play` names) against guests;
    return the job events.

    `cancel` is polled about every 0.5 s; returning True stops the play (ansible-runner
    kills its process group) and the play ends with status `canceled`. Raises PlayError
    with each failed host's message when the play is not successful.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "inventory").mkdir(exist_ok=True)
    (data_dir / "inventory" / "hosts.yml").write_text(yaml.safe_dump(inventory(guests, uri)))
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any]) -> bool:
        events.append(event)
        host = event.get("event_data", {}).get("host")
        if on_event is not None and host:
            on_event(host, event.get("event", ""))
        return True

    r = ansible_runner.run(
        private_data_dir=str(data_dir),
        playbook=str(play if play.endswith((".yml", ".yaml")) else PLAYBOOKS / f"{play}.yml"),
        extravars=dict(extravars),
        forks=max(1, len(guests)),
        quiet=True,
        # Rounded up: int() made 0.5 s into 0, which ansible-runner reads as no timeout.
        timeout=max(1, math.ceil(timeout_s)),
        event_handler=handler,
        # Always pass a cancel callback: without one, ansible-runner installs its own
        # SIGINT/SIGTERM handlers for good and ours would never run again.
        cancel_callback=cancel or (lambda: False),
        settings={"pexpect_timeout": 0.5},
        envvars={
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
        },
    )
    if r.status != "successful":
        raise PlayError(play, r.status, r.rc, host_failures(events), events)
    return events


def host_failures(events: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The last failure message of each host that failed or was unreachable."""
    out: dict[str, str] = {}
    for ev in events:
        if ev.get("event") in ("runner_on_failed", "runner_on_unreachable"):
            data = ev.get("event_data", {})
            res = data.get("res", {})
            msg = (res.get("stdout") or res.get("msg") or res.get("stderr") or "").strip()
            out[data.get("host", "?")] = msg.splitlines()[-1] if msg else ev["event"]
    return out


def fill_results(events: Sequence[Mapping[str, Any]]) -> list[FillResult]:
    """Parse each guest's DLFILL DONE line from the status play's ok events."""
    out = []
    for ev in events:
        if ev.get("event") != "runner_on_ok":
            continue
        data = ev.get("event_data", {})
        d = dlfill.done_record(str(data.get("res", {}).get("stdout", "")))
        if d is not None:
            out.append(
                FillResult(
                    guest=data["host"],
                    fill_s=float(d["fill_s"]),
                    dup_pages=d["dup_pages"],
                    zero_pages=d["zero_pages"],
                    unique_pages=d["unique_pages"],
                    volatile_pages=d["volatile_pages"],
                    vmas=d["vmas"],
                    pages=int(d.get("pages", 0)),
                    dlfill_pid=d.get("pid"),
                    region_addr=int(d["addr"], 16) if "addr" in d else None,
                )
            )
    return out


def verifications(events: Sequence[Mapping[str, Any]]) -> list[integrity.Verification]:
    """Each guest's DLFILL VERIFIED line from the verify play's ok events."""
    out = []
    for ev in events:
        if ev.get("event") != "runner_on_ok":
            continue
        data = ev.get("event_data", {})
        lines = integrity.verified_lines(str(data.get("res", {}).get("stdout", "")))
        if lines:
            out.append(integrity.parse_verified(lines[-1], data["host"]))
    return out


class WorkloadDriver:
    """Start, wait for and stop the fill workload on a set of guests."""

    def __init__(
        self,
        guests: Sequence[str],
        artifacts: Path,
        uri: str,
        on_event: EventCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ):
        self.guests = list(guests)
        self.artifacts = artifacts
        self.uri = uri
        self.on_event = on_event
        self.cancel = cancel
        self.started = False

    def _play(
        self, play: str, extravars: Mapping[str, Any], timeout_s: float, cancellable: bool = True
    ) -> list[dict[str, Any]]:
        return run_play(
            play,
            self.guests,
            self.artifacts / play,
            uri=self.uri,
            extravars=extravars,
            timeout_s=timeout_s,
            on_event=self.on_event,
            cancel=self.cancel if cancellable else None,
        )

    def start(self, w: Workload, seed: int, fill_timeout_s: float) -> None:
        self.started = True  # set first: a half-started fleet still needs its stop play
        self._play("workload-start", workload_vars(w, seed, fill_timeout_s), timeout_s=120)

    def wait_filled(self, w: Workload, seed: int, fill_timeout_s: float) -> list[FillResult]:
        events = self._play(
            "workload-status", workload_vars(w, seed, fill_timeout_s), timeout_s=fill_timeout_s + 60
        )
        results = fill_results(events)
        self._require_every_guest("workload-status", {r.guest for r in results}, "DLFILL DONE")
        return results

    def scramble(self, timeout_s: float = 180) -> None:
        """Make every workload page unique to its guest (breaks the workload's sharing)."""
        self._play("workload-scramble", {}, timeout_s=timeout_s)

    def verify(self, timeout_s: float = integrity.VERIFY_TIMEOUT_S) -> list[integrity.Verification]:
        """Every guest's workload checks each of its pages against its pattern."""
        extravars = {"max_polls": int(timeout_s / 0.2)}
        events = self._play("workload-verify", extravars, timeout_s=timeout_s + 60)
        results = verifications(events)
        answered = {v.workload for v in results}
        self._require_every_guest("workload-verify", answered, "DLFILL VERIFIED")
        return results

    def _require_every_guest(self, play: str, answered: set[str], line: str) -> None:
        """A play whose output lacks some guest's result line is incomplete."""
        missing = sorted(set(self.guests) - answered)
        if missing:
            raise PlayError(play, "incomplete", 0, {g: f"no {line} line" for g in missing})

    def stop(self) -> None:
        if self.started:
            # Not cancellable: it runs during teardown, after an interrupt too.
            self._play("workload-stop", {}, timeout_s=120, cancellable=False)
            self.started = False


# ---------------------------------------------------------------- playbook workloads


@dataclass(frozen=True)
class PlayResult:
    """One guest's outcome of one workload play (a row of plays.parquet)."""

    guest: str
    play: str  # "workload" or "load"
    playbook: str
    status: str  # successful, failed, unreachable, canceled
    ok: int
    changed: int
    failures: int
    skipped: int
    tasks_s: float  # the guest's task durations, summed
    message: str | None = None  # the last failure's message


def play_results(
    events: Sequence[Mapping[str, Any]], guests: Sequence[str], play: str, playbook: str,
    status: str,
) -> list[PlayResult]:  # fmt: skip
    """Each guest's counts and task time from the job events; a guest the play never
    reached counts as `status` (the play's own: canceled, timeout)."""
    stats = play_stats(events)
    failures = host_failures(events)
    seconds: dict[str, float] = {}
    for ev in events:
        data = ev.get("event_data", {})
        if ev.get("event", "").startswith("runner_on_") and "duration" in data:
            host = data.get("host", "?")
            seconds[host] = seconds.get(host, 0.0) + float(data.get("duration") or 0.0)
    out = []
    for g in guests:
        st = stats.get(g, {})
        if st.get("dark"):
            state = "unreachable"
        elif st.get("failures") or g in failures:
            state = "failed"
        else:
            state = "successful" if st else status
        out.append(
            PlayResult(
                g,
                play,
                playbook,
                state,
                st.get("ok", 0),
                st.get("changed", 0),
                st.get("failures", 0),
                st.get("skipped", 0),
                round(seconds.get(g, 0.0), 3),
                failures.get(g),
            )
        )
    return out


class PlaybookDriver:
    """A playbook workload: its play in every guest after boot, its load play during the
    hold. Results per guest accumulate in `results`, also when a play fails."""

    def __init__(
        self,
        guests: Sequence[str],
        artifacts: Path,
        uri: str,
        variables: Mapping[str, Any],
        on_event: EventCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ):
        self.guests = list(guests)
        self.artifacts = artifacts
        self.uri = uri
        # Debian's python3 (the connection plugin runs no shell for interpreter
        # discovery); a user's image with Python elsewhere sets it in workload.vars.
        self.variables = {
            "ansible_python_interpreter": "/usr/bin/python3",
            **variables,
            "guest_count": len(self.guests),
        }
        self.on_event = on_event
        self.cancel = cancel
        self.results: list[PlayResult] = []

    def run(self, play: str, playbook: Path, timeout_s: float) -> None:
        """Run playbook in every guest; raises PlayError (results recorded first)."""
        try:
            events = run_play(
                str(playbook.resolve()),
                self.guests,
                self.artifacts / play,
                uri=self.uri,
                extravars=self.variables,
                timeout_s=timeout_s,
                on_event=self.on_event,
                cancel=self.cancel,
            )
        except PlayError as e:
            self.results += play_results(e.events, self.guests, play, str(playbook), e.status)
            raise
        self.results += play_results(events, self.guests, play, str(playbook), "successful")


# ---------------------------------------------------------------- plays on lab machines


def run_machine_play(
    play: str,
    inventory: Mapping[str, Any],
    data_dir: Path,
    *,
    extravars: Mapping[str, Any],
    timeout_s: float,
    forks: int,
    envvars: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Run playbooks/<play>.yml on machines reached over SSH (inventory.py builds the
    inventory and the SSH settings in envvars); return the job events. Raises PlayError
    with each failed or unreachable machine's message."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "inventory").mkdir(exist_ok=True)
    (data_dir / "inventory" / "hosts.yml").write_text(yaml.safe_dump(dict(inventory)))
    events: list[dict[str, Any]] = []

    def handler(event: dict[str, Any]) -> bool:
        events.append(event)
        return True

    r = ansible_runner.run(
        private_data_dir=str(data_dir),
        playbook=str(PLAYBOOKS / f"{play}.yml"),
        extravars=dict(extravars),
        forks=max(1, forks),
        quiet=True,
        timeout=max(1, math.ceil(timeout_s)),
        event_handler=handler,
        cancel_callback=lambda: False,  # see run_play: keeps our signal handlers
        settings={"pexpect_timeout": 0.5},
        envvars={
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ANSIBLE_NOCOLOR": "1",
            **envvars,
        },
    )
    if r.status != "successful":
        raise PlayError(play, r.status, r.rc, host_failures(events))
    return events


def play_stats(events: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """host -> {ok, changed, failures, dark, skipped} from the play's final stats event."""
    for ev in reversed(events):
        if ev.get("event") == "playbook_on_stats":
            data = ev.get("event_data", {})
            keys = ("ok", "changed", "failures", "dark", "skipped")
            hosts = {h for k in keys for h in data.get(k, {}) or {}}
            return {h: {k: int((data.get(k) or {}).get(h, 0)) for k in keys} for h in hosts}
    return {}
