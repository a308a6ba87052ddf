"""Which rows of a store SAE training never reads, so that held-out metrics mean something.

One of two rules, decided from the store's own contents whenever it is opened (so the same
store always holds out the same rows):

- ``documents``: the rows whose tokens belong to the LM's validation documents, as the harvest
  marked them in the store's ``heldout`` array. A harvest of the "all" split of a corpus with
  validation documents marks them (``TokenBlocks.val_mask``).
- ``chunks``: when no row is marked (harvested with ``--split train`` or ``val``, with
  ``--val-fraction 0``, or before stores had the array), the last whole chunks of the store: as
  few as hold ``MIN_ROWS`` rows, at most a quarter of the chunks, and at least one chunk when the
  store has two or more. Whole chunks, so training never reads them at all.

The mask is kept in memory, one byte per row (a store's rows take 2·d bytes each on disk).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MIN_ROWS = 65_536  # enough rows for held-out losses and dead-latent counts to be stable
MAX_FRACTION = 4  # never more than 1/MAX_FRACTION of a store's chunks

DOCUMENTS, CHUNKS = "documents", "chunks"


@dataclass(frozen=True)
class HeldOut:
    """The held-out rows of one store and the rule that chose them."""

    rule: str  # DOCUMENTS or CHUNKS
    mask: np.ndarray  # bool per row: True = held out
    description: str  # a short phrase for people: what is held out and why

    @property
    def rows(self) -> int:
        return int(np.count_nonzero(self.mask))

    def digest(self) -> str:
        """sha256 over the rule and the mask: equal exactly when the same rows are held out."""
        h = hashlib.sha256(self.rule.encode())
        h.update(np.packbits(self.mask).tobytes())
        h.update(str(len(self.mask)).encode())  # packbits pads to whole bytes
        return h.hexdigest()


def last_chunks(rows: int, chunk_rows: int) -> int:
    """How many whole chunks the chunks rule holds out of a store of ``rows`` rows."""
    n_chunks = -(-rows // chunk_rows)
    if n_chunks < 2:
        return 0  # a single chunk is all the training data there is
    # The last chunk may be partial, so count rows from the end, chunk by chunk.
    k, held = 0, 0
    while held < MIN_ROWS and k < n_chunks:
        held += min(chunk_rows, rows - (n_chunks - 1 - k) * chunk_rows)
        k += 1
    return max(1, min(k, n_chunks // MAX_FRACTION))


def decide(marks: np.ndarray | None, rows: int, chunk_rows: int) -> HeldOut:
    """The held-out rows of a store from its ``heldout`` marks (None: a store without the array)."""
    if marks is not None and np.any(marks):
        mask = np.asarray(marks[:rows]) != 0
        n = int(np.count_nonzero(mask))
        return HeldOut(
            DOCUMENTS,
            mask,
            f"the {n:,} rows of the LM's validation documents ({n / rows:.1%} of the store)",
        )
    k = last_chunks(rows, chunk_rows)
    mask = np.zeros(rows, dtype=bool)
    first = rows if k == 0 else (-(-rows // chunk_rows) - k) * chunk_rows
    mask[first:] = True
    if k == 0:
        what = "no rows: the store has a single chunk"
    else:
        what = f"the last {k} chunk{'s' if k > 1 else ''} ({rows - first:,} rows), held out whole"
    if marks is None:
        what += (
            " (the store predates held-out rows; harvest it again with force=True to hold out "
            "the LM's validation documents instead)"
        )
    elif k:
        what += " (the store holds none of the LM's validation documents)"
    return HeldOut(CHUNKS, mask, what)
