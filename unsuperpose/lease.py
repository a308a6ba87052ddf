"""The lock of an output on object storage: a lease, an object created with a conditional PUT
and renewed by a daemon thread (``unsuperpose.locking`` says how it works and when it expires)."""

from __future__ import annotations

import _thread
import datetime
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from email.utils import parsedate_to_datetime

from unsuperpose import storage
from unsuperpose.errors import UserError
from unsuperpose.lock_holder import LOST, Holder, Locked, parse, warn_takeover

# An S3 lease not renewed for this long is expired. Its holder renews it every RENEW_SECONDS, and
# retries a renewal that fails every few seconds; so an outage of the object store shorter than
# about LEASE_SECONDS - 3 x the lease client's timeout (150 s) is ridden out, and a longer one
# stops the holder before its lease can expire (``_Lease._renew``).
LEASE_SECONDS = 180.0
RENEW_SECONDS = 20.0


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
        return parse(data), resp["ETag"], left

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
                warn_takeover(
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
        LOST.pop(str(self.loc), None)
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
                LOST[str(self.loc)] = f"lost the lease {self.loc} on {self.what}: {why}"
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
