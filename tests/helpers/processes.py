"""Stopping a process the test started: by its PID, never by name."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM by PID, wait, SIGKILL if it does not stop; the exit code (None: no process).
    Closes its stdout pipe, if any, so the test leaks no file descriptor."""
    if proc is None:
        return None
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    if proc.stdout:
        proc.stdout.close()
    return proc.returncode
