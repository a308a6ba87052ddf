"""Writes rows into a store one whole chunk at a time, on a background thread.

Compression and the disk write of chunk k overlap the forward pass that produces chunk k+1:
that is what keeps storage overhead small. Memory is bounded by a fixed pool of chunk buffers
(``POOL`` of them): when the disk falls behind, ``add`` waits for a free buffer instead of
queueing more work.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import zarr

from unsuperpose import faults, locking

from . import store
from .bf16 import BF16

POOL = 3  # one being filled, one being written, one spare so neither side waits on the other


class _Chunk:
    """Pre-allocated buffers for one chunk of rows (reused, so no page faults per chunk)."""

    def __init__(self, rows: int, d: int):
        self.acts = np.empty((rows, d), BF16)
        self.tokens = np.empty(rows, np.int32)
        self.positions = np.empty(rows, np.int32)
        self.heldout = np.empty(rows, np.uint8)
        self.start = 0  # first row of the store this chunk holds
        self.filled = 0


class ChunkWriter:
    """Append rows from ``start`` (a chunk boundary) to ``end``; marks the store complete at end.

    ``record_progress=False`` leaves the store's attributes alone: under torchrun several ranks
    write chunks of one store, and only rank 0 may say how far the store is valid (``seek``
    then jumps to the next rows this rank owns, ``wait_written`` tells when its chunks are down).
    """

    def __init__(self, group: zarr.Group, start: int, end: int, *, record_progress: bool = True):
        prog = store.progress(group)
        if start % prog.chunk_rows:
            raise ValueError(f"writing must start on a chunk boundary, not row {start}")
        if not store.has_heldout(group):  # checked here: the writer thread could only die of it
            raise ValueError(f"{group.store} predates the {store.HELDOUT!r} array; create it anew")
        self.group, self.end, self.chunk_rows = group, end, prog.chunk_rows
        self.row = start  # next row that add() expects
        self.record_progress = record_progress
        self.queued = 0  # chunks handed to the writer thread so far
        self._written = 0  # of those, chunks done (on disk, or failed)
        self._done = threading.Condition()
        d = group[store.ACTS].shape[1]
        self._free: queue.Queue[_Chunk] = queue.Queue()
        for _ in range(POOL):
            self._free.put(_Chunk(self.chunk_rows, d))
        self._full: queue.Queue[_Chunk | None] = queue.Queue()
        self._error: BaseException | None = None
        self._current: _Chunk | None = None
        self._thread = threading.Thread(target=self._write_loop, name="harvest-writer", daemon=True)
        self._thread.start()

    def add(
        self,
        acts: np.ndarray,
        tokens: np.ndarray,
        positions: np.ndarray,
        heldout: np.ndarray | None = None,
    ) -> None:
        """Take the next ``len(acts)`` rows (bfloat16 (n, d), int (n,), int (n,), 0/1 (n,)).

        ``heldout`` marks rows of the LM's validation documents; None marks none of them.
        """
        n, i = len(acts), 0
        if self.row + n > self.end:
            raise ValueError(f"rows {self.row}..{self.row + n} run past the planned end {self.end}")
        while i < n:
            chunk = self._current or self._take_free()
            take = min(n - i, self.chunk_rows - chunk.filled)
            lo, hi = chunk.filled, chunk.filled + take
            chunk.acts[lo:hi] = acts[i : i + take]
            chunk.tokens[lo:hi] = tokens[i : i + take]
            chunk.positions[lo:hi] = positions[i : i + take]
            chunk.heldout[lo:hi] = 0 if heldout is None else heldout[i : i + take]
            chunk.filled, i, self.row = hi, i + take, self.row + take
            self._current = chunk
            if chunk.filled == self.chunk_rows or self.row == self.end:
                self._full.put(chunk)
                self.queued += 1
                self._current = None

    def seek(self, row: int) -> None:
        """Continue at ``row`` (a chunk boundary at or after the next row): the rows between
        belong to another rank."""
        if self._current is not None:
            raise ValueError(f"cannot leave row {self.row}: its chunk is only partly filled")
        if row < self.row or row > self.end or (row % self.chunk_rows and row != self.end):
            raise ValueError(
                f"cannot seek from row {self.row} to row {row} "
                f"(chunks of {self.chunk_rows} rows, end {self.end})"
            )
        self.row = row

    def wait_written(self, chunks: int) -> None:
        """Block until the first ``chunks`` queued chunks are on disk; re-raise a write error."""
        with self._done:
            self._done.wait_for(lambda: self._written >= chunks or self._error is not None)
        self._raise_if_failed()

    def close(self) -> None:
        """Wait for every queued chunk to be on disk; re-raise any error of the writer thread."""
        self._full.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop after the chunks already queued (on interrupt): they are complete, keep them.
        After a lost lease, at once: another run may own the store by now, so the writes in
        flight must end with this process, not land later."""
        self._current = None
        self._full.put(None)
        if not locking.lost():
            self._thread.join()

    def _take_free(self) -> _Chunk:
        while True:
            self._raise_if_failed()
            try:
                chunk = self._free.get(timeout=0.5)
            except queue.Empty:
                continue
            chunk.start, chunk.filled = self.row, 0
            return chunk

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self.group.store} failed: {self._error}") from self._error

    def _write_loop(self) -> None:
        try:  # opening the arrays reads their metadata: on object storage that can fail too
            acts, tokens, positions, heldout = (
                store.writable(self.group, n) for n in (store.ACTS, *store.ROW_ARRAYS)
            )
        except BaseException as exc:  # the producer must hear of it, not wait for a free buffer
            faults.mark(exc, _where(self.group))
            self._error = exc
        while (chunk := self._full.get()) is not None:
            if self._error is None and locking.lost():  # the store may be another run's now
                self._error = RuntimeError("; ".join(locking.lost()))
            if self._error is not None:
                continue  # drain without writing: rows after a failed chunk must not land
            try:
                lo, hi = chunk.start, chunk.start + chunk.filled
                acts[lo:hi] = chunk.acts[: chunk.filled]
                tokens[lo:hi] = chunk.tokens[: chunk.filled]
                positions[lo:hi] = chunk.positions[: chunk.filled]
                heldout[lo:hi] = chunk.heldout[: chunk.filled]
                # Only now is the chunk whole on disk in all four arrays.
                if self.record_progress:
                    store.record_progress(self.group, hi, complete=hi == self.end)
            except BaseException as exc:  # surfaced to the producer by add()/close()
                faults.mark(exc, _where(self.group))  # a failed write() names no file
                self._error = exc
            finally:
                self._free.put(chunk)
                with self._done:
                    self._written += 1
                    self._done.notify_all()


def _where(group: zarr.Group) -> str:
    """The store's folder or URL, as the user gave it (not zarr's file:// form)."""
    st = group.store
    root = getattr(st, "root", None)  # a LocalStore
    if root is not None:
        return str(root)
    protocol = getattr(getattr(st, "fs", None), "protocol", None)
    protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
    path = getattr(st, "path", None)
    return f"{protocol}://{path}" if protocol and path else str(st)
