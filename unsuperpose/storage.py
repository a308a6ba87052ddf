"""Where stores live: a local folder, or a URL of an object store (``s3://bucket/prefix``).

``location(text)`` turns a ``--out``/``--store`` string into one of two kinds of location:

- a ``pathlib.Path`` for a local folder, so everything local behaves exactly as before
  (atomic writes by temp file + rename, ``shutil.disk_usage``, plain ``zarr.open_group``);
- an ``ObjectPath`` for a URL: ``s3://`` (or any other fsspec protocol whose package is
  installed, e.g. ``gs://`` with gcsfs), with the few Path-like members the pipeline uses (``/``,
  ``name``, ``exists()``, ``str()``) and deliberately no ``__fspath__``, so nothing opens it as a
  local file by mistake.

The functions below take either kind. The engine is fsspec (s3fs for S3) with zarr's own
``FsspecStore`` for the arrays, rather than obstore: the same filesystem object that zarr writes
through also lists, reads small JSON files, and deletes trees, fsspec is already a dependency of
zarr, and the arrays' bytes are identical either way (obstore would only be faster, and SAE
training reads far below the speed of either).

S3 settings come from the standard AWS chain (environment, ``~/.aws/config`` and
``credentials``, ``AWS_PROFILE``, instance roles); the endpoint from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` when set. botocore >= 1.31 reads those two itself; passing the endpoint
explicitly as well makes it part of fsspec's instance-cache key (a changed endpoint gets a new
client) and works with older botocore too. Listings are never cached: other processes (a resumed
harvest, torchrun ranks) write the same prefix, and a cached listing would hide their objects.
An S3 PUT is atomic and S3 reads after writes are strongly consistent, so an object is either
absent or whole, which is all the stores' resume logic needs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unsuperpose import faults
from unsuperpose.config import json_text, write_text_atomic
from unsuperpose.errors import UserError

INSTALL_HINT = "pip install 'unsuperpose[s3]'"


@dataclass(frozen=True)
class ObjectPath:
    """A key prefix in an object store: ``protocol://bucket/key``."""

    protocol: str
    key: str  # "bucket/prefix", no leading or trailing slash

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __truediv__(self, part: str | os.PathLike) -> ObjectPath:
        part = str(part).strip("/")
        return ObjectPath(self.protocol, f"{self.key}/{part}" if part else self.key)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.protocol, self.key.rsplit("/", 1)[0]) if "/" in self.key else self

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def exists(self) -> bool:
        return exists(self)


Location = Path | ObjectPath


def location(text: str | os.PathLike | ObjectPath) -> Location:
    """A local path or an object-store URL, from what a user typed."""
    if isinstance(text, (Path, ObjectPath)):
        return text
    text = os.fspath(text)
    if "://" not in text:
        return Path(text)
    protocol, _, key = text.partition("://")
    key = "/".join(p for p in key.split("/") if p)
    if protocol == "file":
        return Path("/" + key)
    if not key:
        raise UserError(f"{text!r}: give a bucket and a prefix, e.g. s3://my-bucket/acts/tiny")
    return ObjectPath(protocol.lower(), key)


def is_remote(loc: Location) -> bool:
    return isinstance(loc, ObjectPath)


def resolved(loc: Location) -> str:
    """An absolute form for provenance: the URL itself, or the resolved local path."""
    return str(loc) if is_remote(loc) else str(Path(loc).resolve())


# -- the filesystem behind a URL -------------------------------------------------------------


# -- the retry budget of a request to object storage ----------------------------------------
# Each request (a chunk's PUT, a listing, a read) is tried up to S3_TRIES times, with s3fs's
# waits between tries: 0.1 s growing 1.7-fold up to 15 s, so 20 tries wait 179 s in all (about
# three minutes of outage ridden out). A try gives up after S3_CONNECT_S without a connection or
# S3_READ_S without an answer. What is retried: the endpoint not answering (refused, reset,
# timed out) and its 5xx answers (500, 502, 503 "SlowDown", 504); a refusal it means (403, 404)
# is not. botocore itself is told not to retry, so the two never multiply. Once the budget is
# spent the command ends in one line (exit 74) and a rerun resumes. Environment variables change
# it (the tests' outages are seconds long).
S3_TRIES = 20
S3_CONNECT_S = 10.0
S3_READ_S = 30.0
TRIES_ENV, CONNECT_ENV, READ_ENV = (
    "UNSUPERPOSE_S3_TRIES",
    "UNSUPERPOSE_S3_CONNECT_TIMEOUT",
    "UNSUPERPOSE_S3_READ_TIMEOUT",
)


def retry_budget() -> tuple[int, float, float]:
    """(tries per request, connect timeout s, read timeout s) in force."""
    return (
        max(1, int(os.environ.get(TRIES_ENV, S3_TRIES))),
        float(os.environ.get(CONNECT_ENV, S3_CONNECT_S)),
        float(os.environ.get(READ_ENV, S3_READ_S)),
    )


def waits(tries: int) -> float:
    """Seconds s3fs sleeps over ``tries`` failed tries (``s3fs.core._error_wrapper``)."""
    return sum(min(1.7**i * 0.1, 15) for i in range(tries))


def _transient(exc: BaseException) -> bool:
    """For s3fs: whether a failed try is worth another (an outage, not an answer)."""
    fault = faults.classify(exc)
    return fault is not None and fault.passing


_RETRIES_SET = False


def _retry_transient_errors() -> None:
    """s3fs retries timeouts and dropped connections itself; with this it also retries a refused
    connection and the endpoint's 5xx answers (the handler is s3fs's public hook, process-wide)."""
    global _RETRIES_SET
    if not _RETRIES_SET:
        import s3fs.core

        s3fs.core.set_custom_error_handler(_transient)
        _RETRIES_SET = True


def storage_options(protocol: str, **config: Any) -> dict[str, Any]:
    """fsspec options for ``protocol``: no listing cache; for S3 the environment's endpoint and
    the timeouts of the retry budget (``config``: other botocore settings, e.g. timeouts)."""
    opts: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        opts["use_listings_cache"] = False
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        _, connect_s, read_s = retry_budget()
        opts["config_kwargs"] = {
            "connect_timeout": connect_s,
            "read_timeout": read_s,
            "retries": {"mode": "standard", "total_max_attempts": 1},  # s3fs retries (above)
            **config,
        }
    return opts


def _filesystem(loc: ObjectPath, tries: int | None = None, **config: Any):
    """The fsspec filesystem of ``loc``; ``tries`` and ``config`` (botocore settings) for a
    client that must answer sooner than the retry budget allows (a distinct cached instance)."""
    import fsspec

    try:
        fs = fsspec.filesystem(loc.protocol, **storage_options(loc.protocol, **config))
    except ImportError as exc:
        if loc.protocol in ("s3", "s3a"):
            raise UserError(f"{loc} is on S3, which needs s3fs: {INSTALL_HINT}") from exc
        raise UserError(f"{loc}: {exc}") from exc
    except ValueError as exc:  # an unknown protocol
        raise UserError(f"{loc}: {exc}; use a local path or s3://bucket/prefix") from exc
    if loc.protocol in ("s3", "s3a"):
        _retry_transient_errors()
        fs.retries = tries or retry_budget()[0]  # an attribute of s3fs's, not an argument
    return fs


_NO_KEYS = {"NoCredentialsError", "PartialCredentialsError"}


def _explain(loc: ObjectPath, exc: BaseException) -> UserError | None:
    """One clear message for the ways object storage fails before any data moves (None: other)."""
    names = {t.__name__ for t in type(exc).__mro__}
    endpoint = storage_options(loc.protocol).get("endpoint_url")
    where = f"the endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "AWS's default endpoint"
    if names & _NO_KEYS:
        return UserError(
            f"no AWS credentials for {loc}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with ~/.aws/credentials), and "
            "AWS_ENDPOINT_URL for an S3-compatible service other than AWS"
        )
    if names & {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",
        "ConnectionError",
        "ConnectionRefusedError",
    }:
        return UserError(
            f"cannot reach {where} for {loc} ({exc}); check AWS_ENDPOINT_URL and the network"
        )
    if isinstance(exc, PermissionError):
        return UserError(
            f"access to {loc} was denied at {where} ({exc}); check the credentials "
            "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy"
        )
    return None


def _call(loc: ObjectPath, fn, *args: Any, explain: bool = False, **kw: Any) -> Any:
    """``fn(*args, **kw)``; missing credentials are said at once. ``explain``: so are an
    unreachable endpoint and a denied access, as bad settings (``check_access``, before any
    work); later they are faults of a run under way (``unsuperpose.faults``): the one-line error
    then says what the run kept, and ``loc`` is marked as where they happened."""
    try:
        return fn(*args, **kw)
    except UserError:
        raise
    except Exception as exc:
        explained = _explain(loc, exc)
        no_keys = {t.__name__ for t in type(exc).__mro__} & _NO_KEYS
        if explained is None or not (explain or no_keys):
            faults.mark(exc, loc)
            raise
        raise explained from exc


def check_access(loc: Location) -> None:
    """Fail now, with one message saying what to set, if ``loc``'s bucket cannot be used.

    Run before any work (loading a model, a forward pass), so nothing is started in vain. Few
    retries and a short connect timeout: an unreachable endpoint should not take a minute to say so.
    """
    if not is_remote(loc):
        return
    fs = _filesystem(loc, tries=2, connect_timeout=5)
    try:
        _call(loc, fs.info, loc.bucket, explain=True)
    except FileNotFoundError:
        raise UserError(
            f"the bucket {loc.bucket!r} of {loc} does not exist; create it (e.g. "
            f"`aws s3 mb s3://{loc.bucket}`) or name another one"
        ) from None


# -- operations on either kind of location ---------------------------------------------------


def exists(loc: Location) -> bool:
    """Whether a file or a folder (a non-empty prefix, on object storage) is at ``loc``."""
    if not is_remote(loc):
        return Path(loc).exists()
    fs = _filesystem(loc)
    if _call(loc, fs.exists, loc.key):
        return True
    check_access(loc)  # absent, or is the whole bucket missing? say which
    return False


def make_dirs(loc: Location) -> None:
    """A local folder is created; object storage has no folders, so its bucket is checked."""
    if is_remote(loc):
        check_access(loc)
    else:
        Path(loc).mkdir(parents=True, exist_ok=True)


def remove_tree(loc: Location, first: str | None = None) -> None:
    """Delete ``loc`` and everything under it (nothing there is fine).

    ``first``: a file under ``loc`` deleted before the rest, so that an interrupted removal
    leaves a tree recognisably without it (a store's ``zarr.json``).
    """
    if not is_remote(loc):
        if Path(loc).exists():
            shutil.rmtree(loc)
        return
    fs = _filesystem(loc)
    if first is not None and _call(loc, fs.exists, (loc / first).key):
        _call(loc, fs.rm, (loc / first).key)
    if _call(loc, fs.exists, loc.key):
        _call(loc, fs.rm, loc.key, recursive=True)


def list_files(loc: Location) -> list[str]:
    """Every file under ``loc``, as paths relative to it with '/' separators (none: [])."""
    if not is_remote(loc):
        root = Path(loc)
        if not root.is_dir():
            return []
        return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    fs = _filesystem(loc)
    prefix = loc.key + "/"
    return [k[len(prefix) :] for k in _call(loc, fs.find, loc.key) if k.startswith(prefix)]


def modified_times(loc: ObjectPath) -> dict[str, float]:
    """Every file under ``loc`` (relative paths, as ``list_files``) -> its modification time
    (seconds since the epoch; files whose store records none are left out)."""
    fs = _filesystem(loc)
    prefix = loc.key + "/"
    found = _call(loc, fs.find, loc.key, detail=True)
    times = {}
    for key, info in found.items():
        when = info.get("LastModified") or info.get("mtime")
        if key.startswith(prefix) and when is not None:
            times[key[len(prefix) :]] = when.timestamp() if hasattr(when, "timestamp") else when
    return times


def read_text(loc: Location) -> str:
    if not is_remote(loc):
        return Path(loc).read_text(encoding="utf-8")
    fs = _filesystem(loc)
    return _call(loc, fs.cat_file, loc.key).decode("utf-8")


def write_text(loc: Location, text: str) -> None:
    """Write so that a reader never sees half a file (locally temp + rename; one S3 PUT)."""
    if not is_remote(loc):
        write_text_atomic(loc, text)
        return
    fs = _filesystem(loc)
    _call(loc, fs.pipe_file, loc.key, text.encode("utf-8"))


def read_json(loc: Location) -> Any:
    return json.loads(read_text(loc))


def write_json(loc: Location, data: Any) -> None:
    """JSON written atomically; the same bytes locally and on object storage."""
    write_text(loc, json_text(data))


def free_bytes(loc: Location) -> int | None:
    """Free space where ``loc`` lives (None: object storage, which has no such limit to check)."""
    return None if is_remote(loc) else shutil.disk_usage(loc).free


# -- zarr ------------------------------------------------------------------------------------


def zarr_store(loc: Location, *, read_only: bool = False) -> Any:
    """What to hand ``zarr.open_group`` for ``loc``: the local path as is, else an FsspecStore."""
    if not is_remote(loc):
        return loc
    from zarr.storage import FsspecStore

    fs = _filesystem(loc)  # the clear error for a missing s3fs, before zarr's own
    store = FsspecStore.from_url(
        str(loc), storage_options=storage_options(loc.protocol), read_only=read_only
    )
    # zarr opens its own, asynchronous instance: the same retry budget for it
    store.fs.retries = fs.retries
    return store


def open_zarr_group(loc: Location, mode: str = "r", **kw: Any) -> Any:
    """``zarr.open_group`` at a local path or a URL (read-only for mode "r")."""
    import zarr

    store = zarr_store(loc, read_only=mode == "r")
    if is_remote(loc):
        return _call(loc, zarr.open_group, store, mode=mode, **kw)
    return zarr.open_group(store, mode=mode, **kw)


# -- whole folders, for run folders worked on in a local mirror ------------------------------


def upload_tree(local: Path, remote: ObjectPath, files: list[str] | None = None) -> None:
    """Copy ``files`` (paths relative to ``local``; default: every file there) to the same
    names under ``remote``, replacing what is there.

    One list-to-list ``put`` rather than a recursive one: fsspec's recursive copy nests the
    source folder's own name under the target when the target already exists, and s3fs sends
    a list of files concurrently anyway.
    """
    local = Path(local)
    files = list_files(local) if files is None else list(files)
    if not files:
        return
    fs = _filesystem(remote)
    _call(remote, fs.put, [str(local / f) for f in files], [(remote / f).key for f in files])


def download_tree(remote: ObjectPath, local: Path, files: list[str] | None = None) -> None:
    """Copy ``files`` (paths relative to ``remote``; default: every file under it) to the same
    names under the local folder ``local``."""
    files = list_files(remote) if files is None else list(files)
    local = Path(local)
    for f in files:
        (local / f).parent.mkdir(parents=True, exist_ok=True)
    if files:
        fs = _filesystem(remote)
        _call(remote, fs.get, [(remote / f).key for f in files], [str(local / f) for f in files])
