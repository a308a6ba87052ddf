"""Waiting for a child process to reach a state before the test acts on it (kill -9, SIGTERM).

A test that kills a process "once it has written X" must wait for X however slow the machine
is: a fixed deadline that expires and kills anyway turns a busy CI machine into a failure
far from its cause (the kill then lands before X, and the test fails on what it finds). So the
bound here is generous and, when it is reached, the test fails saying so.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

TIMEOUT = 900.0  # seconds; only a broken process waits this long


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen,
    what: str,
    *,
    timeout: float = TIMEOUT,
    poll: float = 0.02,
) -> None:
    """Return once ``ready()``; fail the test if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout:.0f} s")
        time.sleep(poll)
