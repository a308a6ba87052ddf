"""Waiting for a child process to reach a state before the test acts on it (kill -9, SIGTERM).

A test that kills a process "once it has written X" must wait for X however slow the machine
is: a fixed deadline that expires and kills anyway turns a busy CI machine into a failure
far from its cause (the kill then lands before X, and the test fails on what it finds). So the
bound here is generous and, when it is reached, the test fails saying so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import warnings
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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so
    killing its process group would leave them running)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [
                int(c)
                for t in os.listdir(f"/proc/{p}/task")
                for c in open(f"/proc/{p}/task/{t}/children").read().split()
            ]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


SETTLE = 0.5  # seconds for requests a frozen process had already sent to reach their server


def kill_when(
    ready: Callable[[], bool],
    proc: subprocess.Popen,
    what: str,
    *,
    timeout: float = TIMEOUT,
    poll: float = 0.02,
) -> None:
    """SIGKILL ``proc`` and every process below it at a moment when ``ready()`` holds.

    For a state that can also go again (a checkpoint on object storage loses its state.json
    while the next one is copied up), seeing it and then killing is a race: the process runs on
    in between. So the tree is frozen first (SIGSTOP), the state is checked again once requests
    already in flight have landed, and only then killed; a state that went in between is
    waited for anew.
    """
    deadline = time.monotonic() + timeout
    while True:
        wait_until(ready, proc, what, timeout=max(deadline - time.monotonic(), 1.0), poll=poll)
        _signal_tree(proc, signal.SIGSTOP)
        time.sleep(SETTLE)
        if ready():
            break
        # Said, so a repeat of the suite shows how often the race this avoids comes up.
        warnings.warn(f"{what}: gone again before the freeze; waiting for the next", stacklevel=2)
        _signal_tree(proc, signal.SIGCONT)
    _signal_tree(proc, signal.SIGKILL)
    proc.wait(timeout=30)
