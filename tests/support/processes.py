"""Stopping a process a test started: SIGTERM, then SIGKILL if it has not gone in time."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen, grace: float = 20) -> int:
    """The process's exit code once it is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
