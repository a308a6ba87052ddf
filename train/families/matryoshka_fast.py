"""The ``matryoshka`` family's fast path: ``BatchTopKFastGroup``'s sparse step (the batch top
B*k codes as a flat list of entries, AuxK on them) with every nested prefix's reconstruction
loss, computed from the same entries without a dense decode per prefix.

The entries come sorted by (dictionary, row, latent), so each row's entries fall into buckets by
prefix in order: one embedding_bag decodes every (row, bucket), cumulative sums over the buckets
give the P prefix reconstructions, and each entry's gradient is taken against the sum of the
gradients of the prefixes that contain it (``sparse_step.bag_step``). Loss and gradients are
``MatryoshkaGroup``'s (checked against it in tests/test_batchtopk_fast.py).

Devices: on any device other than the CPU the group runs ``MatryoshkaGroup``'s autograd step.
"""

from __future__ import annotations

from unsuperpose.train.families.batchtopk_fast import BatchTopKFastGroup
from unsuperpose.train.families.matryoshka import MatryoshkaGroup
from unsuperpose.train.registry import register_fast_path


class MatryoshkaFastGroup(BatchTopKFastGroup, MatryoshkaGroup):
    """``MatryoshkaGroup`` whose CPU step is sparse after the encoder GEMM (off the CPU:
    ``MatryoshkaGroup``'s autograd step, next in the method order)."""

    def prefixes(self) -> list[int]:
        """Every distinct prefix size, increasing, the whole dictionary last (counted once, as
        ``MatryoshkaGroup.extra_loss`` leaves it to ``recon_loss``)."""
        return sorted(set(self.prefix_sizes) | {self.n})


register_fast_path("matryoshka", MatryoshkaFastGroup)
