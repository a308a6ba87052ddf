"""I/O faults: a full disk, a denied permission, a read-only file system, an object store that
cannot be reached or refuses, a credential it rejects.

None of them is a bug, and none of them loses what a stage has already kept: every file of ours
appears whole or not at all (temp file + rename locally, one PUT on S3), a store counts its rows
only once their chunks are down, a checkpoint is swapped in only once it is whole. So such an
error deserves one line that says so, not a traceback. ``classify(exc)`` finds the fault
anywhere in an exception's chain (zarr, safetensors, s3fs and the harvest's writer thread each
wrap the ``OSError`` or the botocore error in one of their own) and says what it was; the command
layer turns it into that line (``unsuperpose.commands.errors.fault_line``).

``writing(path)`` names the path for errors that carry none: a failed ``write()`` has no file
name, a safetensors error has neither a name nor an errno, only "(os error 28)" in its text.
"""

from __future__ import annotations

import contextlib
import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PATH_ATTR = "_unsuperpose_fault_path"

# errno -> (kind, how the line says it)
_LOCAL = {
    errno.ENOSPC: ("disk-full", "the disk is full"),
    errno.EDQUOT: ("disk-full", "the disk quota is used up"),
    errno.EFBIG: ("disk-full", "the file grew past what the file system allows"),
    errno.EACCES: ("permission", "permission denied"),
    errno.EPERM: ("permission", "permission denied"),
    errno.EROFS: ("read-only", "the file system is read-only"),
    errno.EIO: ("io", "an input/output error (the disk or a network file system failed)"),
}
# How Python ("[Errno 28]") and Rust ("(os error 28)", safetensors) write an errno in a message.
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)")

# botocore, aiohttp and fsspec names for "the endpoint did not answer" (matched by name: none of
# those packages is needed unless a location is on object storage).
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "ConnectionAbortedError",
    "BrokenPipeError",
}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthFailure",
}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidObjectState"}
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


@dataclass(frozen=True)
class Fault:
    """What went wrong: ``kind`` (disk-full, permission, read-only, io, unreachable, refusing,
    credentials, denied), the phrase the line uses, the path if known, and the error's own text."""

    kind: str
    cause: str
    path: str | None
    detail: str

    @property
    def remote(self) -> bool:
        return self.kind in ("unreachable", "refusing", "credentials", "denied")

    @property
    def passing(self) -> bool:
        """Whether waiting may cure it (an outage), rather than the user changing something."""
        return self.kind in ("unreachable", "refusing")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {t.__name__ for t in type(exc).__mro__}


def _path_of(chain: list[BaseException]) -> str | None:
    # The link nearest the fault knows best: its own file name (an open or a rename that
    # failed), else the mark of the ``writing`` block it passed through; outer marks are only
    # the stage's output as a whole.
    for exc in reversed(chain):
        name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
        if name:
            return str(name)
        marked = getattr(exc, _PATH_ATTR, None)
        if marked:
            return marked
    return None


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _object_store(exc: BaseException) -> tuple[str, str] | None:
    names = _names(exc)
    if names & _NO_CREDENTIALS:
        return "credentials", "no credentials were found for the object store"
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = str(response["Error"].get("Code") or "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _BAD_CREDENTIALS:
            return "credentials", f"the object store rejected the credentials ({code})"
        if code in _DENIED or status == 403:
            return "denied", f"the object store denied access ({code or status})"
        if code in _BUSY or (isinstance(status, int) and status >= 500):
            # an answer without a body (to a HEAD) has only its status for a code
            code = "" if code == str(status) else f" {code}"
            return "refusing", f"the object store kept failing (HTTP {status}{code})"
        return None
    if names & _UNREACHABLE:
        return "unreachable", "the object store could not be reached"
    return None


def _local(exc: BaseException) -> tuple[str, str] | None:
    number = exc.errno if isinstance(exc, OSError) else None
    if number is None:
        found = _ERRNO_IN_TEXT.search(str(exc))
        if found:
            number = int(found.group(1) or found.group(2))
        elif "No space left on device" in str(exc):
            number = errno.ENOSPC
    return _LOCAL.get(number) if number is not None else None


def classify(exc: BaseException) -> Fault | None:
    """The I/O fault behind ``exc``, or None when it is not one (a bug, a refusal, Ctrl-C)."""
    chain = list(_chain(exc))
    # The object store's own answer first: s3fs turns a 403 into a PermissionError and a 503
    # into OSError(EIO), which read as local faults without it.
    for found in map(_object_store, chain):
        if found:
            return Fault(*found, _path_of(chain), _detail(chain[-1]))
    if any(isinstance(getattr(link, "response", None), dict) for link in chain):
        return None  # the store answered, and not with a fault (no such bucket: bad input)
    for link in chain:
        found = _local(link)
        if found:
            return Fault(*found, _path_of(chain), _detail(link))
    return None


def mark(exc: BaseException, path: str | Path) -> None:
    """Say which path ``exc`` happened at, unless something nearer the fault already said."""
    if getattr(exc, _PATH_ATTR, None) is None:
        try:
            setattr(exc, _PATH_ATTR, str(path))
        except (AttributeError, TypeError):  # a type without __dict__: the line names none
            pass


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run the block; an I/O fault raised in it is marked as having happened at ``path``."""
    try:
        yield
    except Exception as exc:
        if classify(exc) is not None:
            mark(exc, path)
        raise
