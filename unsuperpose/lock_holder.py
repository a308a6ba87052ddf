"""Who holds a lock (``Holder``), the refusal a second writer gets (``Locked``), and where a
lock lives (``lock_path``): what the file lock and the S3 lease share (``unsuperpose.locking``
says how the two work)."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from unsuperpose import storage
from unsuperpose.errors import UserError

LOST: dict[str, str] = {}  # the leases this process has lost -> why (see locking.check_held, lost)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the refusal message and the takeover warning name."""

    pid: int
    host: str
    command: str
    started: str  # ISO 8601, UTC
    token: str  # random, one per acquisition: tells this holding from an earlier one
    pid_space: str = ""  # which machine's pids ``pid`` counts in (see pid_space_here)

    @classmethod
    def me(cls) -> Holder:
        now = datetime.datetime.now(datetime.UTC)
        return cls(
            os.getpid(),
            socket.gethostname(),
            _command_line(),
            now.isoformat(timespec="seconds"),
            secrets.token_hex(8),
            pid_space_here(),
        )

    def dead_here(self) -> bool:
        """Whether this holder ran where this process runs (the same boot of the same kernel,
        the same pid namespace) and its pid runs no more. Host names alone would not do:
        containers on two machines may share one."""
        return (
            bool(self.pid_space) and self.pid_space == pid_space_here() and not pid_runs(self.pid)
        )

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, `{self.command}`, started {self.started}"


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("unsuperpose", "__main__.py"):
        argv[0] = "unsuperpose"
    return shlex.join(argv)


def pid_space_here() -> str:
    """This boot of this kernel and this pid namespace: where a pid means one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: pids cannot be compared across machines safely
        return ""


def parse(data: bytes | str) -> Holder | None:
    try:
        record = json.loads(data)
        return Holder(**{k: record[k] for k in Holder.__dataclass_fields__ if k in record})
    except (ValueError, TypeError, AttributeError):
        return None


class Locked(UserError):
    """Another run is writing this output."""

    def __init__(self, what: str, holder: Holder | None, lock: str, after: str = ""):
        self.holder = holder
        who = holder.describe() if holder else "a run that has not written its name into it yet"
        stop = f"stop it (kill {holder.pid} on {holder.host})" if holder else "stop it"
        super().__init__(
            f"{what} is being written by another run ({who}; lock {lock}); wait for "
            f"it to end, or {stop} and run this command again to resume what it "
            f"left, or write elsewhere{after}"
        )


def lock_path(output: storage.Location) -> storage.Location:
    """Where ``output``'s lock lives: ``<parent>/.<name>.lock`` (see ``locking``)."""
    if storage.is_remote(output):
        if "/" not in output.key:  # a whole bucket: the lock can only go inside
            return output / ".lock"
        return output.parent / f".{output.name}.lock"
    path = Path(output).resolve()
    return path.parent / f".{path.name}.lock"


def warn_takeover(what: str, lock: str, previous: Holder, how: str) -> None:
    print(
        f"unsuperpose: warning: {what}: took over the lock {lock} from a run that ended without "
        f"releasing it ({previous.describe()}; {how}); what it left is checked as usual (a "
        "checkpoint or an unfinished store resumes, anything made otherwise is refused)",
        file=sys.stderr,
    )


def pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
