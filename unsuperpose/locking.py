"""One writer per output: a command that writes a run folder or a store locks it first.

``with hold(output): ...`` takes an advisory lock on ``output`` (a local path or an object-store
URL) for as long as the command writes it. A second writer is refused at once with one message
(``Locked``, a UserError) naming the holder: pid, host, command line, start time. Readers
(``analyze``, a resumed run comparing what a folder holds) take no lock; every writer makes its
files appear whole (temp file + rename locally, one PUT on S3), so a reader never sees half a file.

**Where.** Beside the output, never inside it: ``<parent>/.<name>.lock`` (``runs/toy`` is locked
by ``runs/.toy.lock``, ``acts/tiny/layer1.zarr`` by ``acts/tiny/.layer1.zarr.lock``). Outputs are
replaced as a whole (a store is built beside its path and renamed into place, --force and
--overwrite delete trees, a run on S3 is mirrored file by file), and a lock file deleted or
replaced with them would stop excluding anyone; beside the output it is also never listed as
part of a store, copied with a run, or compared with another run's files.

**Locally** it is ``fcntl.flock`` on the open lock file, exclusive and non-blocking, held until
the command ends. The holder writes its record into the file once it has the lock, and deletes
the file (still holding the lock) when it is done. The kernel drops a flock when its holder's
process ends in any way, SIGKILL and power cuts included (nothing of it survives a reboot), so
**a dead holder is detected** by the lock being free while the file is still there, naming
another run: the newcomer takes it over with a warning that says whether that pid still runs on
this host (if it does, the pid was reused). flock works between the processes of one machine and,
on Linux, over NFS (emulated there with POSIX locks), so a shared folder is locked across nodes
as far as its server honours locks.

**On object storage** (``s3://``) it is a lease: an object at the same place, created with a
conditional PUT (``If-None-Match: *``), so that of two writers exactly one creates it. It carries
the holder's record and its lease time (``LEASE_SECONDS``); a daemon thread renews it every
``RENEW_SECONDS`` with a PUT conditional on its own ETag (``If-Match``). A holder that died stops
renewing, and **its lease is expired** once the server's clock (the response's Date) is past the
object's Last-Modified plus its lease time: both are the server's clock, so the machines' clocks
do not matter. A holder that ran on the same machine as the newcomer (same kernel boot, same pid
namespace: ``Holder.pid_space``) and whose pid no longer runs is dead at once, without waiting
for its lease (a run killed and rerun on one machine resumes right away). The next writer then
replaces a dead holder's lease with a PUT conditional on its ETag (of two such writers one wins)
and warns. A holder that cannot renew in time (stalled past its lease, or its lease was taken
over) has lost it: it says so, its main thread is interrupted as by Ctrl-C, ``check_held`` refuses
its further copies (a run's checkpoint upload), and it never deletes the newer holder's lease.

**Under torchrun** rank 0 takes the lock alone (a refusal is raised on every rank, with its
message). Then every other rank reads the lock and checks that it is rank 0's (the record's
random token) before anything is written, so no rank writes into an output it does not see
locked (a folder that the nodes do not share is refused here). Rank 0 releases it once every
rank has finished.

The parts: ``lock_holder.py`` (the holder's record, the refusal, where a lock lives),
``file_lock.py`` (flock) and ``lease.py`` (the S3 lease); this module is what the commands call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from unsuperpose import distributed, storage
from unsuperpose.errors import UserError
from unsuperpose.file_lock import _FileLock
from unsuperpose.lease import LEASE_SECONDS, RENEW_SECONDS, _Lease
from unsuperpose.lock_holder import LOST, Holder, Locked, lock_path, parse

__all__ = [
    "LEASE_SECONDS",
    "RENEW_SECONDS",
    "Holder",
    "Locked",
    "acquire",
    "check_held",
    "current_holder",
    "forget_lost",
    "hold",
    "lock_path",
    "lost",
]


def acquire(
    output: storage.Location,
    *,
    what: str | None = None,
    lease_s: float = LEASE_SECONDS,
    renew_s: float = RENEW_SECONDS,
    on_lost: Callable[[], None] | None = None,
) -> _FileLock | _Lease:
    """Take ``output``'s lock in this process (no torchrun logic: see ``hold``); ``.release()``."""
    output = storage.location(output)
    what = what or str(output)
    where = lock_path(output)
    if storage.is_remote(where):
        return _Lease(where, Holder.me(), what, lease_s, renew_s, on_lost).acquire()
    return _FileLock.acquire(where, Holder.me(), what)


def check_held(output: storage.Location) -> None:
    """UserError if this process has lost its lease on ``output``: for writes that must not
    happen then, such as copying a run up after the interruption that losing it caused."""
    where = lock_path(storage.location(output))
    if str(where) in LOST:
        raise UserError(
            f"lost the lease {where} on {output}: another run may be writing it now, "
            "so nothing more is written there; run this command again when it is done"
        )


def lost() -> list[str]:
    """Why each lease this process held was lost (empty: none was): a writer stops writing."""
    return list(LOST.values())


def forget_lost() -> None:
    """A new command in this process (the CLI called again, as tests do) starts with none lost."""
    LOST.clear()


def current_holder(output: storage.Location) -> Holder | None:
    """Who holds ``output``'s lock as its lock file or lease says (None: nobody wrote one)."""
    where = lock_path(storage.location(output))
    if storage.is_remote(where):
        got = _Lease(where, Holder.me(), "", LEASE_SECONDS, RENEW_SECONDS, None).read()
        return None if got is None else got[0]
    try:
        return parse(Path(where).read_bytes())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def hold(output: storage.Location, *, what: str | None = None, **kw) -> Iterator[Holder]:
    """``output`` locked while the block runs; under torchrun, by rank 0 and seen by every rank.

    Call after ``distributed.setup``. ``what``: how messages name the output (default: its
    path); ``kw``: ``acquire``'s lease settings.
    """
    output = storage.location(output)
    what = what or str(output)
    mine: list = []

    def take() -> Holder:
        mine.append(acquire(output, what=what, **kw))
        return mine[0].holder

    def sees(holder: Holder) -> None:
        seen = current_holder(output)
        if seen is None or seen.token != holder.token:
            raise UserError(
                f"rank {distributed.rank()} does not see rank 0's lock on {what} "
                f"({lock_path(output)}); every process must see the same output "
                "(on several nodes: a folder they all mount, or s3://)"
            )

    holder = distributed.from_main(take)
    finished = False
    try:
        distributed.everywhere(lambda: None if distributed.is_main() else sees(holder))
        yield holder
        finished = True
    finally:
        if finished:
            distributed.barrier(patient=True)  # no rank still writes when rank 0 lets go
        if mine:
            mine[0].release()
