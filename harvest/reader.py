"""Reading a store back: ``ActivationStore``, an activation source for SAE training.

The stream is a pure function of (seed, position). Each epoch visits the chunks in a random
order (seeded by (seed, epoch)) and cuts that order into groups of ``buffer_chunks`` chunks;
the rows of a group are permuted together (seeded by (seed, epoch, group)), so a batch mixes
rows from several distant parts of the corpus. Where batch k starts is plain arithmetic over
chunk sizes, so ``start=k`` jumps there without reading anything before it. A background
thread decodes the next group into a pre-allocated buffer and cuts batches while the consumer
trains on the previous ones.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from zarr.core.buffer.cpu import NDBuffer

from unsuperpose.errors import UserError

from . import store
from .bf16 import BF16, bf16_to_float32

PREFETCH_BATCHES = 4  # batches ready ahead of the consumer; memory is ~that many batches


class ActivationStore:
    """A harvested store as an activation source (``d``, ``batches``), plus its metadata.

    An incomplete store is refused unless ``allow_incomplete=True``, which reads only its
    complete chunks.
    """

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self._group = store.open_group(self.path, mode="r")
        prog = store.progress(self._group)
        if not prog.complete and not allow_incomplete:
            raise UserError(f"{self.path} is incomplete ({prog.rows_written:,} of "
                            f"{prog.rows_planned:,} rows): run the same harvest command again to "
                            "finish it, or open it with allow_incomplete=True to read the "
                            "complete chunks only")
        self._acts = self._group[store.ACTS]
        self.chunk_rows = prog.chunk_rows
        self.rows = prog.rows_written if not prog.complete else prog.rows_planned
        if self.rows == 0:
            raise UserError(f"{self.path} holds no complete chunk yet; harvest more first")
        self._check_chunks_present()
        self.provenance = store.provenance(self._group)
        self.metadata = dict(self._group.attrs)

    @property
    def d(self) -> int:
        return int(self._acts.shape[1])

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def describe(self) -> dict:
        """Provenance for whatever is trained on this store (saved beside it as JSON)."""
        return {"kind": "activation_store", "path": str(self.path.resolve()), "rows": self.rows,
                "d": self.d, **{k: v for k, v in self.metadata.items() if k != "rows_written"}}

    def tokens(self) -> np.ndarray:
        """Token id of every row (int32, small: 4 bytes per row), for analysis."""
        return self._group[store.TOKENS][: self.rows]

    def positions(self) -> np.ndarray:
        return self._group[store.POSITIONS][: self.rows]

    def read_rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` as a bfloat16 NumPy array (checksummed on read)."""
        if not 0 <= lo <= hi <= self.rows:
            raise IndexError(f"rows {lo}:{hi} outside 0:{self.rows}")
        out = np.empty((hi - lo, self.d), BF16)
        self._read_into(lo, hi, out)
        return out

    def batches(self, batch_size: int, *, seed: int = 0, start: int = 0, shuffle: bool = True,
                buffer_chunks: int = 8) -> Iterator[torch.Tensor]:
        """Endless float32 (batch_size, d) batches; ``start=k`` continues after batch k-1.

        With ``shuffle=False`` the rows come in store order, epoch after epoch.
        ``buffer_chunks`` chunks are mixed together (memory: that many chunks of bfloat16).
        """
        if batch_size < 1 or start < 0 or buffer_chunks < 1:
            raise ValueError("batch_size and buffer_chunks must be >= 1 and start >= 0")
        out: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, name="store-prefetch", daemon=True,
            args=(out, stop, batch_size, seed, start, shuffle, buffer_chunks))
        worker.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    # -- the stream ----------------------------------------------------------------------------

    def epoch_groups(self, seed: int, epoch: int, shuffle: bool, buffer_chunks: int) -> list[np.ndarray]:
        """The chunk indices of each group of one epoch, in the order they are served."""
        order = np.arange(self.n_chunks)
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(self.n_chunks)
        return [order[i:i + buffer_chunks] for i in range(0, self.n_chunks, buffer_chunks)]

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_rows, self.rows - c * self.chunk_rows)

    def _produce(self, out: queue.Queue, stop: threading.Event, batch_size: int, seed: int,
                 start: int, shuffle: bool, buffer_chunks: int) -> None:
        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            buf = np.empty((buffer_chunks * self.chunk_rows, self.d), BF16)
            pending: list[np.ndarray] = []
            have = 0
            epoch, skip = divmod(start * batch_size, self.rows)
            while not stop.is_set():
                for g, chunks in enumerate(self.epoch_groups(seed, epoch, shuffle, buffer_chunks)):
                    n = sum(self._chunk_len(int(c)) for c in chunks)
                    if skip >= n:  # wholly before the start position: never read it
                        skip -= n
                        continue
                    self._load_group(chunks, buf)
                    perm = (np.random.default_rng([seed, epoch, g]).permutation(n)
                            if shuffle else np.arange(n))
                    i, skip = skip, 0
                    while i < n:
                        take = min(n - i, batch_size - have)
                        pending.append(buf[perm[i:i + take]])  # a copy: buf is reused
                        have, i = have + take, i + take
                        if have == batch_size:
                            rows = pending[0] if len(pending) == 1 else np.concatenate(pending)
                            if not put(torch.from_numpy(bf16_to_float32(rows))):
                                return
                            pending, have = [], 0
                epoch += 1
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    def _load_group(self, chunks: np.ndarray, buf: np.ndarray) -> None:
        at = 0
        for c in chunks:
            lo = int(c) * self.chunk_rows
            n = self._chunk_len(int(c))
            self._read_into(lo, lo + n, buf[at:at + n])
            at += n

    def _read_into(self, lo: int, hi: int, out: np.ndarray) -> None:
        # Decoding straight into reused memory avoids fresh pages per chunk (see FACTS.md).
        try:
            self._acts.get_basic_selection((slice(lo, hi), slice(None)),
                                           out=NDBuffer.from_numpy_array(out))
        except ValueError as exc:
            if "checksum" not in str(exc):
                raise
            raise UserError(f"{self.path}: a chunk of rows {lo}..{hi} is corrupt (crc32c checksum "
                            "mismatch); delete the store and harvest it again") from exc

    def _check_chunks_present(self) -> None:
        # A missing chunk file would silently read back as zeros. Chunk keys are c/<row>/0.
        acts_dir = self.path / store.ACTS / "c"
        present = {int(p.parent.name) for p in acts_dir.glob("*/0")} if acts_dir.is_dir() else set()
        missing = [c for c in range(self.n_chunks) if c not in present]
        if missing:
            raise UserError(f"{self.path} is corrupt: {len(missing)} chunk(s) of acts are missing "
                            f"(first: rows from {missing[0] * self.chunk_rows:,}); delete the "
                            "store and harvest it again")

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, rows={self.rows:,}, d={self.d}, "
                f"hook={self.provenance.hook!r})")
