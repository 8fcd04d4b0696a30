"""progress.LogStatus: the report's INFO messages on a status line (terminal only);
warnings still reach the root handlers; the loggers are left as they were."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from orchestrator.progress import LogStatus


@pytest.mark.parametrize("terminal", [True, False])
def test_status_line_takes_info_and_lets_warnings_through(
    terminal: bool, caplog: pytest.LogCaptureFixture
) -> None:
    console = Console(file=io.StringIO(), force_terminal=terminal)
    log = logging.getLogger("orchestrator.results.test")
    parent = logging.getLogger("orchestrator.results")
    before = (parent.level, parent.propagate)
    caplog.set_level(logging.WARNING)
    with LogStatus(console, "orchestrator.results") as status:
        log.info("walks: combinations over 3 file(s)")
        log.warning("a table could not be read")
        assert (status.status is not None) == terminal
    messages = [r.getMessage() for r in caplog.records]
    assert "a table could not be read" in messages
    assert "walks: combinations over 3 file(s)" not in messages
    assert (parent.level, parent.propagate) == before and status not in parent.handlers
