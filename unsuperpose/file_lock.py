"""The lock of a local output: ``fcntl.flock`` on ``<parent>/.<name>.lock``, its holder's record
in the file (``unsuperpose.locking`` says how it works and why it detects a dead holder)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from unsuperpose import lock_holder
from unsuperpose.lock_holder import Holder, Locked, parse, warn_takeover


class _FileLock:
    def __init__(self, path: Path, fd: int, holder: Holder):
        self.path, self.fd, self.holder = path, fd, holder

    @classmethod
    def acquire(cls, path: Path, me: Holder, what: str) -> _FileLock:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _record_of(fd)
                os.close(fd)
                raise Locked(what, holder, str(path)) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder released and deleted it between our open and flock: again
        previous = parse(_read(fd))
        data = json.dumps(asdict(me)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        if previous is not None:
            if previous.pid_space != me.pid_space or not me.pid_space:
                how = (
                    f"it ran on {previous.host}, another machine or container, and its lock "
                    "was free, so it runs no more"
                )
            elif lock_holder.pid_runs(previous.pid):
                how = f"pid {previous.pid} runs, but without the lock: the pid was reused"
            else:
                how = f"pid {previous.pid} no longer runs"
            warn_takeover(what, str(path), previous, how)
        return cls(path, fd, me)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()  # while still locked: a waiting newcomer then retries
        finally:
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def _record_of(fd: int, patience: float = 2.0) -> Holder | None:
    """The holder's record; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + patience
    while True:
        holder = parse(_read(fd))
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)
