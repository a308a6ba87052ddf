"""Reading a store back: ``ActivationStore``, an activation source for SAE training.

The training stream never yields a held-out row (``heldout.py`` says which rows those are);
``heldout_batches`` serves exactly them, in store order, for held-out metrics.

The stream is a pure function of (seed, position). Each epoch visits the chunks that hold
training rows in a random order (seeded by (seed, epoch)) and cuts that order into groups of
``buffer_chunks`` chunks; the training rows of a group are permuted together (seeded by (seed,
epoch, group)), so a batch mixes rows from several distant parts of the corpus. Where batch k
starts is plain arithmetic over the training rows per chunk, so ``start=k`` jumps there without
reading anything before it. A background thread decodes the next group into a pre-allocated
buffer and cuts batches while the consumer trains on the previous ones.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from zarr.core.buffer.cpu import NDBuffer

from unsuperpose import storage

from . import heldout, store
from .bf16 import BF16, bf16_to_float32
from .store import StoreError

PREFETCH_BATCHES = 4  # batches ready ahead of the consumer; memory is ~that many batches


class ActivationStore:
    """A harvested store as an activation source (``d``, ``batches``), plus its metadata.

    An incomplete store is refused unless ``allow_incomplete=True``, which reads only its
    complete chunks (and holds out rows of those by the same rules, so fewer or other ones than
    the finished store will).
    """

    def __init__(self, path: str | Path | storage.ObjectPath, *, allow_incomplete: bool = False):
        self.path = storage.location(path)  # a local folder or s3://bucket/prefix/layer1.zarr
        self._group = store.open_group(self.path, mode="r")
        prog = store.progress(self._group)
        if not prog.complete and not allow_incomplete:
            raise StoreError(
                f"{self.path} is incomplete ({prog.rows_written:,} of "
                f"{prog.rows_planned:,} rows): run the same harvest command again to "
                "finish it, or open it with allow_incomplete=True to read the "
                "complete chunks only"
            )
        self._acts = self._group[store.ACTS]
        self.chunk_rows = prog.chunk_rows
        self.rows = prog.rows_written if not prog.complete else prog.rows_planned
        if self.rows == 0:
            raise StoreError(f"{self.path} holds no complete chunk yet; harvest more first")
        self._check_chunks_present()
        self.provenance = store.provenance(self._group)
        self.metadata = dict(self._group.attrs)
        if not store.has_heldout(self._group):
            print(
                f"note: {self.path} was harvested before stores recorded held-out rows; SAE "
                f"training holds out {self.heldout_description}"
            )

    @property
    def d(self) -> int:
        return int(self._acts.shape[1])

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    # -- held-out rows -------------------------------------------------------------------------

    @cached_property
    def _heldout(self) -> heldout.HeldOut:
        marks = self._group[store.HELDOUT][: self.rows] if store.has_heldout(self._group) else None
        return heldout.decide(marks, self.rows, self.chunk_rows)

    @cached_property
    def _train_per_chunk(self) -> np.ndarray:
        """Training (not held-out) rows in each chunk: all the epoch arithmetic needs."""
        starts = np.arange(0, self.rows, self.chunk_rows)
        held = np.add.reduceat(self._heldout.mask, starts, dtype=np.int64)
        return np.array([self._chunk_len(c) for c in range(self.n_chunks)]) - held

    @property
    def train_rows(self) -> int:
        """Rows the training stream serves: ``rows`` minus the held-out ones."""
        return int(self._train_per_chunk.sum())

    @property
    def heldout_description(self) -> str:
        """What is held out and by which rule, as a short phrase."""
        return self._heldout.description

    def heldout_mask(self) -> np.ndarray:
        """True for every held-out row (bool, one per row): for analysis that must avoid them."""
        return self._heldout.mask.copy()

    def heldout_rows(self, max_rows: int | None = None) -> int:
        """How many rows ``heldout_batches(..., max_rows)`` yields in total."""
        n = self._heldout.rows
        return n if max_rows is None else min(n, max(0, int(max_rows)))

    def heldout_batches(
        self, batch_size: int, max_rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Float32 (<= batch_size, d) batches of the held-out rows in store order, then stop.

        At most ``max_rows`` rows in all (None: every one), the first ones in store order; only
        the last batch may be shorter. Never any row the training stream serves.
        """
        if batch_size < 1 or (max_rows is not None and max_rows < 0):
            raise ValueError("batch_size must be >= 1 and max_rows >= 0")
        left, mask = self.heldout_rows(max_rows), self._heldout.mask
        pending: list[np.ndarray] = []
        have = 0
        for c in range(self.n_chunks):
            if left == 0:
                break
            lo = c * self.chunk_rows
            idx = np.flatnonzero(mask[lo : lo + self._chunk_len(c)])[:left]
            if not len(idx):
                continue
            # Read only the span of the chunk's held-out rows (zarr decodes the whole chunk anyway).
            span = self.read_rows(lo + int(idx[0]), lo + int(idx[-1]) + 1)
            pending.append(span[idx - idx[0]] if len(idx) < len(span) else span)
            have, left = have + len(idx), left - len(idx)
            while have >= batch_size:
                rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
                yield torch.from_numpy(bf16_to_float32(rows[:batch_size]))
                pending, have = (
                    ([rows[batch_size:]] if have > batch_size else []),
                    have - batch_size,
                )
        if have:
            yield torch.from_numpy(bf16_to_float32(np.concatenate(pending)))

    # -- metadata ------------------------------------------------------------------------------

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what the training stream and the held-out rows are made of.

        Equal for two reads of the same store; different whenever the model, corpus, hook,
        width, context, row count, chunking (the shuffle's unit) or held-out rows differ.
        """
        p = self.provenance
        identity = {
            "weights_sha256": p.weights_sha256,
            "corpus_fingerprint": p.corpus_fingerprint,
            "hook": p.hook,
            "layer": p.layer,
            "width": p.width,
            "n_ctx": p.n_ctx,
            "dtype": p.dtype,
            "rows": self.rows,
            "chunk_rows": self.chunk_rows,
            "heldout": {
                "rule": self._heldout.rule,
                "rows": self._heldout.rows,
                "mask_sha256": self._heldout.digest(),
            },
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """Provenance for whatever is trained on this store (saved beside it as JSON)."""
        return {
            "kind": "activation_store",
            "path": storage.resolved(self.path),
            "rows": self.rows,
            "d": self.d,
            **{k: v for k, v in self.metadata.items() if k != "rows_written"},
            "train_rows": self.train_rows,
            "heldout_rows": self.heldout_rows(),
            "heldout_rule": self._heldout.rule,
            "heldout": self.heldout_description,
            "fingerprint": self.fingerprint,
        }

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

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
        buffer_chunks: int = 8,
    ) -> Iterator[torch.Tensor]:
        """Endless float32 (batch_size, d) batches; ``start=k`` continues after batch k-1.

        With ``shuffle=False`` the rows come in store order, epoch after epoch.
        ``buffer_chunks`` chunks are mixed together (memory: that many chunks of bfloat16).
        """
        if batch_size < 1 or start < 0 or buffer_chunks < 1:
            raise ValueError("batch_size and buffer_chunks must be >= 1 and start >= 0")
        if self.train_rows == 0:  # also computes the held-out split here, not on the worker
            raise StoreError(
                f"{self.path}: all of its {self.rows:,} rows are held out "
                f"({self.heldout_description}), none is left to train on; harvest "
                "more tokens so it holds training documents too"
            )
        out: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce,
            name="store-prefetch",
            daemon=True,
            args=(out, stop, batch_size, seed, start, shuffle, buffer_chunks),
        )
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

    def epoch_groups(
        self, seed: int, epoch: int, shuffle: bool, buffer_chunks: int
    ) -> list[np.ndarray]:
        """The chunk indices of each group of one epoch, in the order they are served.

        Only chunks with training rows take part: a wholly held-out chunk is never read.
        """
        order = np.flatnonzero(self._train_per_chunk)
        if shuffle:
            order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
        return [order[i : i + buffer_chunks] for i in range(0, len(order), buffer_chunks)]

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk_rows, self.rows - c * self.chunk_rows)

    def _produce(
        self,
        out: queue.Queue,
        stop: threading.Event,
        batch_size: int,
        seed: int,
        start: int,
        shuffle: bool,
        buffer_chunks: int,
    ) -> None:
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
            epoch, skip = divmod(start * batch_size, self.train_rows)
            while not stop.is_set():
                for g, chunks in enumerate(self.epoch_groups(seed, epoch, shuffle, buffer_chunks)):
                    n = int(self._train_per_chunk[chunks].sum())
                    if skip >= n:  # wholly before the start position: never read it
                        skip -= n
                        continue
                    keep = self._load_group(chunks, buf)
                    perm = (
                        np.random.default_rng([seed, epoch, g]).permutation(n)
                        if shuffle
                        else np.arange(n)
                    )
                    if keep is not None:  # positions in buf of the group's training rows
                        perm = keep[perm]
                    i, skip = skip, 0
                    while i < n:
                        take = min(n - i, batch_size - have)
                        pending.append(buf[perm[i : i + take]])  # a copy: buf is reused
                        have, i = have + take, i + take
                        if have == batch_size:
                            rows = pending[0] if len(pending) == 1 else np.concatenate(pending)
                            if not put(torch.from_numpy(bf16_to_float32(rows))):
                                return
                            pending, have = [], 0
                epoch += 1
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    def _load_group(self, chunks: np.ndarray, buf: np.ndarray) -> np.ndarray | None:
        """Decode the chunks into ``buf``; returns where its training rows are (None: all rows)."""
        at, keep, mask = 0, [], self._heldout.mask
        for c in chunks:
            lo = int(c) * self.chunk_rows
            n = self._chunk_len(int(c))
            self._read_into(lo, lo + n, buf[at : at + n])
            keep.append(at + np.flatnonzero(~mask[lo : lo + n]))
            at += n
        keep_all = np.concatenate(keep)
        return None if len(keep_all) == at else keep_all

    def _read_into(self, lo: int, hi: int, out: np.ndarray) -> None:
        # Decoding straight into reused memory: a fresh buffer per chunk is fresh pages, each
        # faulted in and zeroed by the kernel before the decoder writes it.
        try:
            self._acts.get_basic_selection(
                (slice(lo, hi), slice(None)), out=NDBuffer.from_numpy_array(out)
            )
        except ValueError as exc:
            if "checksum" not in str(exc):
                raise
            raise StoreError(
                f"{self.path}: a chunk of rows {lo}..{hi} is corrupt (crc32c checksum "
                "mismatch); delete the store and harvest it again"
            ) from exc

    def _check_chunks_present(self) -> None:
        # A missing chunk file would silently read back as zeros: for acts, zero activations; for
        # the held-out marks, validation rows served for training. Acts chunk keys are c/<row>/0,
        # those of the 1-d arrays c/<row>. One listing per array, locally or on object storage.
        for name, last in ((store.ACTS, "/0"), (store.HELDOUT, "")):
            if name == store.HELDOUT and not store.has_heldout(self._group):
                continue
            keys = storage.list_files(self.path / name / "c")
            present = {
                int(k[: len(k) - len(last)])
                for k in keys
                if k.endswith(last) and k[: len(k) - len(last)].isdigit()
            }
            missing = [c for c in range(self.n_chunks) if c not in present]
            if missing:
                raise StoreError(
                    f"{self.path} is corrupt: {len(missing)} chunk(s) of {name} are "
                    f"missing (first: rows from {missing[0] * self.chunk_rows:,}); "
                    "delete the store and harvest it again"
                )

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, rows={self.rows:,}, d={self.d}, "
            f"hook={self.provenance.hook!r})"
        )
