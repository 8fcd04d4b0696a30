"""What every trial of a run shares: the spec, the run store, the libvirt connection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import images, store
from orchestrator.engine.state import Progress
from orchestrator.guestimage import GuestBoot
from orchestrator.interrupts import InterruptGuard
from orchestrator.spec import Spec


@dataclass
class RunContext:
    spec: Spec
    spec_path: Path
    store: store.RunStore
    image: images.TinyImage
    conn: Any
    domain_type: str
    facts: dict[str, Any]  # this machine's, from the doctor
    guard: InterruptGuard
    progress: Progress
    boot: GuestBoot | None = None  # None: the tiny image (tests that build a context)
