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
"""

from __future__ import annotations

import _thread
import contextlib
import datetime
import errno
import fcntl
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

from unsuperpose import distributed, storage
from unsuperpose.errors import UserError

# An S3 lease not renewed for this long is expired. Its holder renews it every RENEW_SECONDS, and
# retries a renewal that fails every few seconds; so an outage of the object store shorter than
# about LEASE_SECONDS - 3 x the lease client's timeout (150 s) is ridden out, and a longer one
# stops the holder before its lease can expire (``_Lease._renew``).
LEASE_SECONDS = 180.0
RENEW_SECONDS = 20.0
_LOST: dict[str, str] = {}  # the leases this process has lost -> why (see check_held, lost)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the refusal message and the takeover warning name."""

    pid: int
    host: str
    command: str
    started: str  # ISO 8601, UTC
    token: str  # random, one per acquisition: tells this holding from an earlier one
    pid_space: str = ""  # which machine's pids ``pid`` counts in (see _pid_space)

    @classmethod
    def me(cls) -> Holder:
        now = datetime.datetime.now(datetime.UTC)
        return cls(
            os.getpid(),
            socket.gethostname(),
            _command_line(),
            now.isoformat(timespec="seconds"),
            secrets.token_hex(8),
            _pid_space(),
        )

    def dead_here(self) -> bool:
        """Whether this holder ran where this process runs (the same boot of the same kernel,
        the same pid namespace) and its pid runs no more. Host names alone would not do:
        containers on two machines may share one."""
        return bool(self.pid_space) and self.pid_space == _pid_space() and not _pid_runs(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, `{self.command}`, started {self.started}"


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("unsuperpose", "__main__.py"):
        argv[0] = "unsuperpose"
    return shlex.join(argv)


def _pid_space() -> str:
    """This boot of this kernel and this pid namespace: where a pid means one process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: pids cannot be compared across machines safely
        return ""


def _parse(data: bytes | str) -> Holder | None:
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
    """Where ``output``'s lock lives: ``<parent>/.<name>.lock`` (module docstring)."""
    if storage.is_remote(output):
        if "/" not in output.key:  # a whole bucket: the lock can only go inside
            return output / ".lock"
        return output.parent / f".{output.name}.lock"
    path = Path(output).resolve()
    return path.parent / f".{path.name}.lock"


def _warn(what: str, lock: str, previous: Holder, how: str) -> None:
    print(
        f"unsuperpose: warning: {what}: took over the lock {lock} from a run that ended without "
        f"releasing it ({previous.describe()}; {how}); what it left is checked as usual (a "
        "checkpoint or an unfinished store resumes, anything made otherwise is refused)",
        file=sys.stderr,
    )


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# -- a local file ----------------------------------------------------------------------------


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
        previous = _parse(_read(fd))
        data = json.dumps(asdict(me)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        if previous is not None:
            if previous.pid_space != me.pid_space or not me.pid_space:
                how = (
                    f"it ran on {previous.host}, another machine or container, and its lock "
                    "was free, so it runs no more"
                )
            elif _pid_runs(previous.pid):
                how = f"pid {previous.pid} runs, but without the lock: the pid was reused"
            else:
                how = f"pid {previous.pid} no longer runs"
            _warn(what, str(path), previous, how)
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
        holder = _parse(_read(fd))
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


# -- a lease on object storage ---------------------------------------------------------------


def _precondition_failed(exc: BaseException) -> bool:
    """An S3 conditional write refused: 412 (the condition) or 409 (a concurrent one)."""
    while exc is not None:
        if isinstance(exc, FileExistsError):
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if error.get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ) or status in (409, 412):
                return True
        exc = exc.__cause__
    return False


class _Lease:
    def __init__(
        self,
        loc: storage.ObjectPath,
        me: Holder,
        what: str,
        lease_s: float,
        renew_s: float,
        on_lost: Callable[[], None] | None,
    ):
        if loc.protocol not in ("s3", "s3a"):
            raise UserError(
                f"{loc}: writing to {loc.protocol}:// is not supported (no lease to "
                "keep two writers apart); use s3:// or a local folder"
            )
        self.loc, self.holder, self.what = loc, me, what
        self.lease_s, self.renew_s = float(lease_s), float(renew_s)
        self.on_lost = on_lost or _thread.interrupt_main
        self.fs = storage._filesystem(loc)  # the same client as the rest of the run
        # Renewals go through a client of their own that answers within ``attempt_s`` (one try,
        # short timeouts), so the renewing thread always knows in time whether it still holds
        # the lease; the run's client may spend minutes retrying one request.
        timeout = max(0.5, min(10.0, (self.lease_s - self.renew_s) / 4))
        self.attempt_s = 3 * timeout  # connecting, sending, waiting for the answer
        self.renew_fs = storage._filesystem(
            loc,
            tries=1,
            connect_timeout=timeout,
            read_timeout=timeout,
            user_agent_extra="unsuperpose-lease",  # never the run's client, whatever its timeouts
        )
        self.bucket, self.key = loc.key.split("/", 1)
        self.etag: str | None = None
        self.renewals = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.lease_s)
        return json.dumps(
            {
                **asdict(self.holder),
                "lease_seconds": self.lease_s,
                "expires": expires.isoformat(timespec="seconds"),
            }
        ).encode()

    def _put(self, fs=None, **condition: str) -> str:
        return (fs or self.fs).call_s3(
            "put_object",
            Bucket=self.bucket,
            Key=self.key,
            Body=self._body(),
            ContentType="application/json",
            **condition,
        )["ETag"]

    def read(self, fs=None) -> tuple[Holder | None, str, float] | None:
        """(holder, ETag, seconds left by the server's clock), or None when there is no lease."""
        fs = fs or self.fs

        async def get():
            resp = await fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp
            finally:
                resp["Body"].close()

        from fsspec.asyn import sync

        try:
            data, resp = sync(fs.loop, get)
        except FileNotFoundError:
            return None
        try:
            lease_s = float(json.loads(data).get("lease_seconds", LEASE_SECONDS))
        except (ValueError, AttributeError):
            lease_s = LEASE_SECONDS
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.datetime.now(datetime.UTC)
        left = lease_s - (now - resp["LastModified"]).total_seconds()
        return _parse(data), resp["ETag"], left

    def acquire(self) -> _Lease:
        for _ in range(10):
            self.sent = time.monotonic()  # its Last-Modified, by the server's clock, is later
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as exc:  # noqa: BLE001 (anything else is raised below)
                if not _precondition_failed(exc):
                    raise
            got = self.read()
            if got is None:
                continue  # released meanwhile: try again
            holder, etag, left = got
            if holder is not None and holder.token == self.holder.token:
                self.etag = etag  # our own PUT, retried after its answer was lost
                break
            dead = holder is not None and holder.dead_here()
            if left >= 0 and not dead:
                until = (
                    f"; if it has died, its lease expires in {left:.0f} s "
                    "and can then be taken over"
                )
                raise Locked(self.what, holder, str(self.loc), until)
            self.sent = time.monotonic()
            try:
                self.etag = self._put(IfMatch=etag)
            except Exception as exc:  # noqa: BLE001
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    continue  # another writer took it over first, or it was released
                raise
            if holder is not None:
                _warn(
                    self.what,
                    str(self.loc),
                    holder,
                    f"pid {holder.pid} no longer runs on this machine"
                    if dead
                    else f"its lease expired {-left:.0f} s ago without being renewed",
                )
            break
        else:
            raise UserError(f"{self.loc}: the lease changed hands at every try; run again")
        _LOST.pop(str(self.loc), None)
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.loc}", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        """Renew every ``renew_s``; after a failure, again every few seconds. The lease expires
        ``lease_s`` after the server received the last renewal, which was after ``ok`` (when it
        was sent): a renewal that could end past that is not started, the lease is given up
        instead, so the holder has stopped before another run can take it over."""
        ok, failed = self.sent, False
        while not self._stop.wait(min(self.renew_s, 2.0) if failed else self.renew_s):
            why = None
            if time.monotonic() + self.attempt_s > ok + self.lease_s:
                why = f"it could not be renewed for {time.monotonic() - ok:.0f} s"
            else:
                sent = time.monotonic()
                try:
                    self.etag = self._put(self.renew_fs, IfMatch=self.etag)
                    ok, failed = sent, False
                    self.renewals += 1
                    continue
                except Exception as exc:  # noqa: BLE001 (judged below; a passing error retries)
                    taken = _precondition_failed(exc) or isinstance(exc, FileNotFoundError)
                    if taken and self._still_mine():  # a renewal whose answer was lost
                        ok, failed = sent, False
                        continue
                    failed = True
                    if taken:
                        why = "another run took it over"
                    elif time.monotonic() + self.attempt_s > ok + self.lease_s:
                        why = f"it could not be renewed for {time.monotonic() - ok:.0f} s ({exc})"
            if why is not None:
                self.lost = True
                _LOST[str(self.loc)] = f"lost the lease {self.loc} on {self.what}: {why}"
                self.on_lost()
                return

    def _still_mine(self) -> bool:
        try:
            got = self.read(self.renew_fs)
        except Exception:  # noqa: BLE001 (unknown: not ours)
            return False
        if got is None or got[0] is None or got[0].token != self.holder.token:
            return False
        self.etag = got[1]
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.lost or self.etag is None:
            return
        try:
            if self._still_mine():  # never another run's lease
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        except Exception as exc:  # noqa: BLE001 (the run itself is done; say so, do not fail it)
            print(
                f"unsuperpose: warning: could not delete the lease {self.loc} ({exc}); it "
                f"expires {self.lease_s:.0f} s after its last renewal",
                file=sys.stderr,
            )
        self.etag = None


# -- what the commands use -------------------------------------------------------------------


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
    if str(where) in _LOST:
        raise UserError(
            f"lost the lease {where} on {output}: another run may be writing it now, "
            "so nothing more is written there; run this command again when it is done"
        )


def lost() -> list[str]:
    """Why each lease this process held was lost (empty: none was): a writer stops writing."""
    return list(_LOST.values())


def forget_lost() -> None:
    """A new command in this process (the CLI called again, as tests do) starts with none lost."""
    _LOST.clear()


def current_holder(output: storage.Location) -> Holder | None:
    """Who holds ``output``'s lock as its lock file or lease says (None: nobody wrote one)."""
    where = lock_path(storage.location(output))
    if storage.is_remote(where):
        got = _Lease(where, Holder.me(), "", LEASE_SECONDS, RENEW_SECONDS, None).read()
        return None if got is None else got[0]
    try:
        return _parse(Path(where).read_bytes())
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
