"""The activation-source interface: all that ``train`` knows about its data.

A source is anything with a width ``d`` and a ``batches`` method yielding float32 tensors of
shape (batch_size, d). The toy generator (``unsuperpose.toy.ToySource``) and a harvested Zarr
store (``unsuperpose.harvest.ActivationStore``) both satisfy it structurally; neither imports
this module, and ``train`` never imports them.

``batches(batch_size, seed=s, start=k)`` must yield exactly the stream that
``batches(batch_size, seed=s)`` yields after its first ``k`` batches: that is what makes a
resumed training run end with the same weights as an uninterrupted one.

The final metrics (``train.evaluate``) need rows that no training batch ever holds, whatever its
seed: ``heldout_batches(batch_size, max_rows)`` yields them (the same ones every call; the last
batch may be shorter), ``heldout_rows(max_rows)`` says how many that is and
``heldout_description`` what they are (a store: its LM validation documents or whole chunks;
toy data: a generator stream of its own). ``describe()``, when present, returns provenance with
a ``fingerprint`` that identifies the data for resuming and merging runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ActivationSource(Protocol):
    @property
    def d(self) -> int:
        """Width of each activation vector."""
        ...

    def batches(self, batch_size: int, *, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """An endless, deterministic stream of float32 (batch_size, d) tensors from ``start``."""
        ...


def check_source(source: object) -> ActivationSource:
    """Fail early, with a plain message, when something that is not a source is passed in."""
    if not isinstance(source, ActivationSource):
        raise TypeError(
            f"{type(source).__name__} is not an activation source: it needs a `d` "
            "property and a `batches(batch_size, *, seed, start)` method"
        )
    if int(source.d) < 1:
        raise ValueError(f"activation source has width d={source.d}; it must be at least 1")
    return source
