"""create_domain tries again on the one transient libvirt start failure seen here (the
BPF verifier's EAGAIN when a signal is pending), and on nothing else. The domain is a
failure-injection fake: a real libvirtd cannot be made to hit that race on demand."""

from __future__ import annotations

import libvirt
import pytest

from orchestrator import fleet

EAGAIN = "failed to load cgroup BPF prog: Resource temporarily unavailable"


class InjectedError(libvirt.libvirtError):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg

    def get_error_message(self) -> str:
        return self.msg


class FailingDomain:
    """Raises the given messages from create(), one per call, then starts."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.creates = 0

    def name(self) -> str:
        return "dl-fake"

    def create(self) -> int:
        self.creates += 1
        if self.failures:
            raise InjectedError(self.failures.pop(0))
        return 0


def test_a_transient_bpf_load_failure_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.time, "sleep", lambda _s: None)
    dom = FailingDomain(EAGAIN, EAGAIN)
    fleet.create_domain(dom)  # type: ignore[arg-type]
    assert dom.creates == 3


def test_other_failures_and_the_last_try_are_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.time, "sleep", lambda _s: None)
    dom = FailingDomain("Cannot access storage file '/x': No such file or directory")
    with pytest.raises(libvirt.libvirtError, match="storage file"):
        fleet.create_domain(dom)  # type: ignore[arg-type]
    assert dom.creates == 1
    dom = FailingDomain(*[EAGAIN] * fleet.START_ATTEMPTS)
    with pytest.raises(libvirt.libvirtError, match="BPF prog"):
        fleet.create_domain(dom)  # type: ignore[arg-type]
    assert dom.creates == fleet.START_ATTEMPTS
