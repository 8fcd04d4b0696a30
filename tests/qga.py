"""A minimal qemu-ga client for tests that boot guests with plain QEMU (no libvirt)."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path

import pytest

FILE_CHUNK_BYTES = 192 * 1024


class Agent:
    """A minimal qemu-ga client over QEMU's unix socket: one JSON document per line."""

    def __init__(self, path: Path, timeout_s: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send(self, execute: str, **arguments: object) -> None:
        msg: dict[str, object] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def sync(self, sync_id: int | None = None) -> None:
        """guest-sync (a fresh id unless given); replies to earlier requests (stale, left
        by a previous client) are skipped."""
        sync_id = sync_id if sync_id is not None else random.randrange(1, 2**31)
        self.send("guest-sync", id=sync_id)
        while json.loads(self.reader.readline()).get("return") != sync_id:
            pass

    def call(self, execute: str, **arguments: object) -> object:
        self.send(execute, **arguments)
        reply = json.loads(self.reader.readline())
        assert "return" in reply, reply
        return reply["return"]

    def exec_sh(self, script: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
        """guest-exec /bin/sh -c script; returns (exit code, stdout, stderr)."""
        started = self.call(
            "guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True}
        )
        assert isinstance(started, dict)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.call("guest-exec-status", pid=started["pid"])
            assert isinstance(status, dict)
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                return int(status.get("exitcode", -1)), out, err
            time.sleep(0.05)
        pytest.fail(f"guest-exec {script!r} did not finish in {timeout_s} s")

    def ok(self, script: str, timeout_s: float = 60.0) -> str:
        rc, out, err = self.exec_sh(script, timeout_s)
        assert rc == 0, f"{script!r} exited {rc}: {err.strip() or out.strip()}"
        return out

    def push(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Write a file into the guest (guest-file-*), then chmod it."""
        handle = self.call("guest-file-open", path=path, mode="w")
        try:
            for i in range(0, len(data), FILE_CHUNK_BYTES):
                chunk = base64.b64encode(data[i : i + FILE_CHUNK_BYTES]).decode()
                self.call("guest-file-write", handle=handle, **{"buf-b64": chunk})
        finally:
            self.call("guest-file-close", handle=handle)
        self.ok(f"chmod {mode:o} {path}")


def wait_for_marker(console: Path, marker: str, timeout_s: float) -> float:
    """Seconds until marker shows on the console log; fails on an error marker or timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        text = console.read_text(errors="replace")
        if marker in text:
            return time.monotonic() - t0
        if "DENSITYLAB: error" in text or "Kernel panic" in text:
            pytest.fail(f"guest failed before {marker!r}:\n{text[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {marker!r} within {timeout_s} s:\n{console.read_text()[-3000:]}")
