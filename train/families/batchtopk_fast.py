"""The ``batchtopk`` family's fast path: after the encoder GEMM, the step touches only the B*k
codes each dictionary keeps. Layout, loss and threshold are ``BatchTopKGroup``'s (checked
against it in tests/test_batchtopk_fast.py); only ``forward_backward`` differs.

Selection, per dictionary s: the B*k_s largest of ReLU(pre) over the whole batch (B x n
entries). A top-k of the whole (B*n,) vector is slow on the CPU (410 ms at 4096 x 8192, as long
as the encoder GEMM, on one thread), so it runs on candidates: every r-th row of the batch
(~2048 / k rows) estimates a floor that ~1.25 B*k entries exceed, the entries above it are
gathered (one pass), and the exact top B*k is taken among them. Whenever fewer than B*k
entries exceed the floor (a batch unlike its sample) the whole batch is ranked instead, so the
kept set is always the batch's top B*k (up to ties between equal values, as in any top-k).
A row may keep more or fewer than k codes, so the codes are a flat list of entries in
(s, b, latent) order (``sparse_step``): decode, gradients and AuxK run on them. The smallest kept
positive code of every dictionary is the ``kept_min`` reduction the threshold averages, as in
the autograd group.

Devices: on any device other than the CPU the group runs ``BatchTopKGroup``'s autograd step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from unsuperpose.train.families.batchtopk import BatchTopKGroup
from unsuperpose.train.families.sparse_step import (
    SMALL_STEP,
    bag_step,
    encode_into,
    one_thread,
)
from unsuperpose.train.families.stacked import Reductions
from unsuperpose.train.registry import register_fast_path

SAMPLE_KEPT = 2048  # codes the sampled rows keep, at k per row: the floor's sample size
MARGIN = 1.25  # the floor aims at MARGIN * B*k candidates (plus 4 standard deviations)


class BatchTopKFastGroup(BatchTopKGroup):
    """``BatchTopKGroup`` whose CPU step is sparse after the encoder GEMM."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fast = self.device.type == "cpu" and not self.tied
        self.full_ranks = 0  # selections that fell back to ranking the whole batch

    def candidate_floor(self, p: torch.Tensor, k: int) -> float | None:
        """A value that ~MARGIN * B*k entries of p (B, n) exceed, from every r-th row; None
        where that would be (nearly) all of them."""
        B, n = p.shape
        r = max(1, B // math.ceil(SAMPLE_KEPT / k))
        sample = p[::r].reshape(-1)
        want = k * len(sample) // n  # what the sampled rows would keep
        c = math.ceil(MARGIN * want + 4 * math.sqrt(want)) + 1
        if c >= len(sample):
            return None
        return float(sample.topk(c, sorted=False).values.min())

    def select(self, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch top B*k of p (B, n) (before the ReLU): their flat indices b*n + j,
        ascending, and their values."""
        B, n = p.shape
        want = B * k
        floor = self.candidate_floor(p, k)
        if floor is not None:
            mask = p > floor
            cand = mask.view(-1).nonzero().squeeze(1)  # ascending flat indices
            if len(cand) >= want:
                vals, sel = torch.take(p, cand).topk(want, sorted=False)
                idx = cand[sel]
            else:
                floor = None
        if floor is None:
            self.full_ranks += 1
            vals, idx = p.reshape(-1).topk(want, sorted=False)
        with one_thread():
            idx, order = idx.sort()
            return idx, vals[order]

    @torch.no_grad()
    def forward_backward(self, x: torch.Tensor) -> Reductions:
        """Gradients of every dictionary's loss on batch ``x`` into ``.grad``; statistics."""
        if not self.fast:
            return super().forward_backward(x)
        B, n = len(x), self.n
        norms, dn = self.unit_decoder()  # (S, n, 1), (S, n, d)
        pre = encode_into(self, x)  # (B, S, n): the one dense GEMM
        with one_thread() if pre.numel() < SMALL_STEP else nullcontext():
            rows, bags, vals, smallest = [], [], [], []
            for s, k in enumerate(self.k):
                idx, v = self.select(pre[:, s], k)
                with one_thread():
                    v.clamp_(min=0)  # ReLU after the selection: the same codes
                    rows.append(idx % n + s * n)
                    bags.append(idx // n + s * B)
                    vals.append(v)
                    smallest.append(torch.where(v > 0, v, torch.inf).amin())
            # The smallest positive code kept this step per dictionary (inf: none); combined over
            # ranks with "min" and read by ``after_step``.
            self.kept_min = torch.stack(smallest)
            with one_thread():
                rows, bags, v = torch.cat(rows), torch.cat(bags), torch.cat(vals)
                active = v > 0
            _, fired = bag_step(
                self,
                x,
                pre,
                norms,
                dn,
                rows,
                bags,
                v,
                active,
                auxk=True,
                prefixes=self.prefixes(),
            )
            return {"fired": (fired, "sum"), **self.step_reductions()}

    def prefixes(self) -> list[int] | None:
        """The nested prefixes whose reconstructions the loss counts (Matryoshka); None: only
        the whole dictionary's."""
        return None


register_fast_path("batchtopk", BatchTopKFastGroup)
