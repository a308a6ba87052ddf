"""The on-disk layout of an activation store, and how it is created, checked and resumed.

A store is one Zarr v3 group per hook point::

    layer1.zarr/
      zarr.json        group attributes: provenance + progress (see ``Provenance``, ``Progress``)
      acts/            (rows, d) bfloat16, row chunks, zstd + crc32c
      tokens/          (rows,) int32: the token id that produced each row
      positions/       (rows,) int32: that token's place in its block of n_ctx tokens
      heldout/         (rows,) uint8: 1 where the token belongs to one of the LM's validation
                       documents (see ``heldout.py`` for how training uses it)

Rows are written one whole chunk at a time, in order, and ``rows_written`` is raised only after a
chunk of all four arrays is on disk (zarr's local store writes each file atomically). So after
any interruption the store is a valid prefix plus, at worst, a stray chunk past ``rows_written``
that a resumed harvest simply overwrites.

A store may also live on object storage (``s3://bucket/prefix/layer1.zarr``; see
``unsuperpose.storage``), written through zarr's ``FsspecStore``: the same objects, codecs and
crc32c checksums, byte for byte. Every object there is one atomic PUT, so the argument above holds
unchanged, except for creation: a local store is built beside its path and renamed into place,
and object storage has no rename. There the arrays' metadata is written first and the group's
``zarr.json`` gets its attributes (``format`` among them) in one last PUT; a store whose
``zarr.json`` is missing or has no attributes yet is "not a store yet" (``exists`` says False)
and is created anew, provided everything under its prefix is a part of a store (anything else is
refused, never deleted). Removing a store deletes its ``zarr.json`` first, so a removal cut short
leaves such a "not yet" store too.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from unsuperpose import __version__, faults, storage

from . import bf16  # noqa: F401  (registers the "bfloat16" zarr data type)

FORMAT = "unsuperpose.acts/1"
ACTS, TOKENS, POSITIONS, HELDOUT = "acts", "tokens", "positions", "heldout"
ROW_ARRAYS = (TOKENS, POSITIONS, HELDOUT)  # the per-row arrays beside acts, chunked like it


class StoreError(ValueError):
    """An activation store that cannot be used as asked: missing, unreadable or corrupt, not
    finished, or made from another source than the harvest writing to it."""


# Measured here on 65,536 rows of random GPT-2-small MLP activations (d 1024, bfloat16), with
# crc32c, reading whole chunks in random order (2026-11, shared 2-core machine):
#   codec                   ratio  write MB/s  read MB/s
#   none                    1.00     550        2040
#   zstd 1, 1,024 rows      1.28     330         650
#   zstd 1, 4,096 rows      1.28     240         760
#   zstd 1, 16,384 rows     1.28     240         400
#   zstd 3, 4,096 rows      1.28     150         740
#   blosc zstd 1 + shuffle  1.28     410         460
#   blosc lz4 + shuffle     1.13     270        1410
# The mantissa bits are noise, so nothing beats zstd 1's ratio; its ~370k rows/s read is over
# 100x what an SAE step consumes, so disk size decides: zstd 1 in ~8 MiB chunks.
CHUNK_BYTES = 8 << 20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 256, 65536
ZSTD_LEVEL = 1
COMPRESSION_RATIO = 1.28  # for the disk estimate printed before a harvest starts


def default_chunk_rows(d: int) -> int:
    """Rows per chunk: a power of two near CHUNK_BYTES of bfloat16, within sane bounds."""
    rows = 1 << max(0, int(np.log2(CHUNK_BYTES / (2 * d))))
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows)))


def _codecs() -> dict[str, Any]:
    # crc32c last, so it checks the compressed bytes exactly as they lie on disk.
    return {"compressors": [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]}


# Missing chunks would otherwise read back as zeros; every chunk must exist, even an all-zero one.
ARRAY_CONFIG = {"write_empty_chunks": True}


def writable(group: zarr.Group, name: str) -> zarr.Array:
    """One of the store's arrays, opened to write every chunk, all-zero ones included.

    zarr keeps ``write_empty_chunks`` with the open array, not in the metadata, so each open for
    writing must set it again (without it, an all-zero chunk of held-out marks or of acts is
    skipped, and the reader then finds the store missing a chunk).
    """
    return group[name].with_config(ARRAY_CONFIG)


@dataclass(frozen=True)
class Provenance:
    """What produced a store. Two stores with equal identity hold the same rows, in order."""

    model_dir: str
    weights_sha256: str
    hook: str
    layer: int | None
    width: int
    n_ctx: int
    corpus_fingerprint: str
    corpus: dict | None = None
    dtype: str = "bfloat16"
    # sha256 of the whole corpus's validation-document mask (None: no mask, every row 0). The
    # corpus fingerprint of the "all" split does not cover the seeded choice of documents.
    heldout_fingerprint: str | None = None

    # model_dir and the corpus settings are kept for people; the hashes decide sameness.
    IDENTITY = (
        "weights_sha256",
        "hook",
        "width",
        "n_ctx",
        "corpus_fingerprint",
        "dtype",
        "heldout_fingerprint",
    )

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY}


@dataclass(frozen=True)
class Progress:
    rows_planned: int
    rows_written: int
    complete: bool
    chunk_rows: int
    batch_size: int


def create(
    path: storage.Location, prov: Provenance, rows: int, chunk_rows: int, batch_size: int
) -> zarr.Group:
    """A new, empty store at ``path`` (whatever was there is removed first).

    Locally built beside ``path`` and renamed into place, so an interruption never leaves a store
    without its arrays or attributes; on object storage the attributes come last (module docstring).
    """
    if storage.is_remote(path):
        storage.remove_tree(path, first="zarr.json")
        with faults.writing(path):
            _build(path, prov, rows, chunk_rows, batch_size)
        return storage.open_zarr_group(path, mode="r+", zarr_format=3)
    tmp = path.with_name(f".{path.name}.creating")
    for stale in (tmp, path):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        with faults.writing(path):
            _build(tmp, prov, rows, chunk_rows, batch_size)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # never a store; the next harvest builds anew
        raise
    tmp.rename(path)
    return zarr.open_group(path, mode="r+", zarr_format=3)


def _build(
    path: storage.Location, prov: Provenance, rows: int, chunk_rows: int, batch_size: int
) -> None:
    """The arrays' metadata, then the group's attributes in one write (what marks it a store)."""
    group = storage.open_zarr_group(path, mode="w", zarr_format=3)
    group.create_array(
        ACTS,
        shape=(rows, prov.width),
        chunks=(chunk_rows, prov.width),
        dtype="bfloat16",
        fill_value=0,
        config=ARRAY_CONFIG,
        **_codecs(),
    )
    for name, dtype in ((TOKENS, "int32"), (POSITIONS, "int32"), (HELDOUT, "uint8")):
        group.create_array(
            name,
            shape=(rows,),
            chunks=(chunk_rows,),
            dtype=dtype,
            fill_value=0,
            config=ARRAY_CONFIG,
            **_codecs(),
        )
    progress = Progress(rows, 0, False, chunk_rows, batch_size)
    # One write of zarr.json (``attrs.update`` would write it once per key: an object store
    # failing in between would leave a store with half its attributes).
    group.update_attributes(
        {
            "format": FORMAT,
            "unsuperpose_version": __version__,
            **dataclasses.asdict(prov),
            **dataclasses.asdict(progress),
        }
    )


def exists(path: storage.Location) -> bool:
    """Whether a store, finished or not, is at ``path``: a harvest resumes it, not creates one.

    Locally any folder counts (stores appear by a rename, so a folder without ``zarr.json`` is
    something else, which ``open_group`` refuses). On object storage a store interrupted while it
    was being created or removed (``zarr.json`` missing or without attributes) does not count, so
    it is created anew; a prefix holding anything that is not part of a store counts, so that
    ``open_group`` refuses it instead of its objects being deleted.
    """
    if not storage.is_remote(path):
        return path.exists()
    meta = path / "zarr.json"
    if storage.exists(meta) and storage.read_json(meta).get("attributes"):
        return True
    files = storage.list_files(path)
    ours = all(
        f.split("/", 1)[0] in (ACTS, *ROW_ARRAYS) or ("/" not in f and f.endswith(".json"))
        for f in files
    )
    if files and ours:
        print(
            f"harvest: {path} was left half-created or half-removed (no attributes in its "
            "zarr.json); creating it anew"
        )
    return not ours


def open_group(path: storage.Location, mode: str = "r") -> zarr.Group:
    """Open an existing store, or fail saying what the path is instead."""
    path = storage.location(path)
    if not storage.exists(path / "zarr.json"):
        raise StoreError(
            f"{path} is not an activation store (no zarr.json); harvest one there first "
            "(`unsuperpose harvest`)"
        )
    try:
        group = storage.open_zarr_group(path, mode=mode, zarr_format=3)
    # zarr and json raise these families for unreadable metadata (zarr's errors are ValueErrors);
    # object storage's own failures already come with their message and pass through.
    except (ValueError, LookupError, TypeError, OSError) as exc:
        if faults.classify(exc) is not None:  # a full disk or a denied read: not the store's
            raise
        raise StoreError(
            f"{path} cannot be opened as a zarr v3 group ({exc}); delete it and harvest again"
        ) from exc
    if group.attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path} is a zarr group but not an unsuperpose activation store "
            f"(format {group.attrs.get('format')!r}, expected {FORMAT!r})"
        )
    return group


def provenance(group: zarr.Group) -> Provenance:
    attrs = dict(group.attrs)
    # Fields added later have defaults; stores written before them read back with the default.
    return Provenance(
        **{
            f.name: attrs[f.name]
            for f in dataclasses.fields(Provenance)
            if f.name in attrs or f.default is dataclasses.MISSING
        }
    )


def has_heldout(group: zarr.Group) -> bool:
    """Whether the store records held-out rows (stores written before that have no such array)."""
    try:  # not `in group`: listing the members warns about the files zarr does not know
        group[HELDOUT]
    except KeyError:
        return False
    return True


def progress(group: zarr.Group) -> Progress:
    attrs = dict(group.attrs)
    return Progress(**{f.name: attrs[f.name] for f in dataclasses.fields(Progress)})


def kept_rows(path: storage.Location) -> Progress | None:
    """How far the store at ``path`` is valid (its recorded progress), None when there is none:
    what a harvest cut short keeps (a rerun continues after ``rows_written``)."""
    path = storage.location(path)
    if not storage.exists(path / "zarr.json"):
        return None
    return progress(storage.open_zarr_group(path, mode="r", zarr_format=3))


def is_complete(path: storage.Location) -> bool:
    """Whether the store at ``path`` was harvested to the end (not planned, growing or cut
    short)."""
    kept = kept_rows(path)
    return bool(kept and kept.complete)


# zarr's local store writes a chunk to "<key>.<uuid4 hex>.partial" and renames it into place.
_INTERRUPTED_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_interrupted_writes(path: storage.Location) -> int:
    """Delete the temporary files of chunk writes a killed process left in a local store; returns
    how many. They were never part of the store (the chunk they were to become is past
    ``rows_written`` and is written again on resume), but would stay beside it for good.
    Call only while no process writes the store (the harvest's lock, before any rank starts)."""
    if storage.is_remote(path):
        return 0  # an object store has no temporaries: each object is one PUT
    stale = [p for p in Path(path).rglob("*.partial") if _INTERRUPTED_WRITE.search(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def record_progress(group: zarr.Group, rows_written: int, complete: bool) -> None:
    group.update_attributes({"rows_written": int(rows_written), "complete": bool(complete)})


def check_same_source(path: storage.Location, have: Provenance, want: Provenance) -> None:
    """Refuse to append to or replace a store made from something else."""
    if have.width != want.width:
        raise StoreError(
            f"{path} holds {have.hook} activations of width {have.width}, but "
            f"{want.hook} of this model has width {want.width}; write to another "
            "folder, or replace the store with force=True"
        )
    diff = [k for k in Provenance.IDENTITY if getattr(have, k) != getattr(want, k)]
    if diff:
        shown = "; ".join(
            f"{k}: store has {getattr(have, k)!r}, this run {getattr(want, k)!r}" for k in diff
        )
        raise StoreError(
            f"{path} was harvested from another source ({shown}); write to another "
            "folder, or replace it with force=True"
        )


def grow(group: zarr.Group, rows: int) -> None:
    """Extend all arrays to ``rows`` (a larger token budget appends to a store)."""
    for name in (ACTS, *ROW_ARRAYS):
        arr = group[name]
        arr.resize((rows,) + arr.shape[1:])
    group.update_attributes({"rows_planned": int(rows), "complete": False})


def resume_row(prog: Progress) -> int:
    """Where writing restarts: the start of the chunk after the last complete one.

    A finished store whose last chunk is partial restarts at that chunk when it is extended, so
    every chunk is always written whole, in one piece, as an uninterrupted run would write it.
    """
    return (prog.rows_written // prog.chunk_rows) * prog.chunk_rows
