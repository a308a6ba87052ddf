"""The held-out metrics every dictionary is scored by, trained or fitted: one definition.

On the source's held-out rows (never in a training batch), per dictionary:
  heldout_mse      mean squared error per coordinate
  heldout_fvu      squared error over the total variance around the held-out mean
  heldout_mean_l1  mean sum of |codes| per row
  heldout_l1_loss  that in the run's L1 convention, without the coefficient (``losses``)
  heldout_l0       mean count of non-zero codes per row
  heldout_rows     the rows scored
  heldout_dead     latents zero on every held-out row
|codes| and != 0 are the definitions signed codes (a fitted basis's) need too. What only
training leaves (dead counts over a training window, a Matryoshka's prefixes) the trainer adds
(``trainer.evaluate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unsuperpose.train.codes import firing_counts

# x (B, d) -> (codes (B, S, n), reconstructions (S, B, d)) of S dictionaries of n latents
Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class HeldOut:
    """The held-out rows, in batches on one device, and their total variance."""

    xs: list[torch.Tensor]
    rows: int
    d: int
    total_var: float


def heldout_rows(source, batch_size: int, rows: int, device) -> HeldOut:
    """At most ``rows`` of the source's held-out rows, in batches of ``batch_size``."""
    if not hasattr(source, "heldout_batches"):
        raise TypeError(
            f"{type(source).__name__} has no held-out rows (heldout_batches): the "
            "final metrics are only ever computed on data training never saw"
        )
    xs = [x.to(device) for x in source.heldout_batches(batch_size, rows)]
    if not xs:
        raise ValueError("the source has no held-out rows to evaluate on")
    x_all = torch.cat(xs)
    total_var = float((x_all.double() - x_all.double().mean(0)).pow(2).sum())
    return HeldOut(xs, len(x_all), int(x_all.shape[1]), total_var)


@torch.no_grad()
def score(
    held: HeldOut,
    reconstruct: Reconstruct,
    S: int,
    n: int,
    *,
    l1_divisor: float = 1.0,
    each_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[list[dict], torch.Tensor]:
    """The metrics of S dictionaries of n latents (one dict each, in order) and their held-out
    fire counts (S, n); ``each_batch(x, codes)`` sees every batch (for what a caller adds)."""
    device = held.xs[0].device
    sq, l1, l0 = torch.zeros(3, S, dtype=torch.float64, device=device)
    fires = torch.zeros(S, n, dtype=torch.int64, device=device)
    for x in held.xs:
        codes, x_hat = reconstruct(x)
        err = x_hat - x
        sq += err.pow(2).sum(dim=(1, 2), dtype=torch.float64)
        l1 += codes.abs().sum(dim=(0, 2), dtype=torch.float64)
        fired = firing_counts(codes)  # (S, n)
        fires += fired
        l0 += fired.sum(dim=1)
        if each_batch is not None:
            each_batch(x, codes)
    rows, var = held.rows, held.total_var
    out = [
        {
            "heldout_mse": float(sq[s]) / (rows * held.d),
            "heldout_fvu": float(sq[s]) / var if var > 0 else math.nan,
            "heldout_mean_l1": float(l1[s]) / rows,
            "heldout_l1_loss": float(l1[s]) / rows / l1_divisor,
            "heldout_l0": float(l0[s]) / rows,
            "heldout_rows": rows,
            "heldout_dead": int((fires[s] == 0).sum()),
        }
        for s in range(S)
    ]
    return out, fires


def one(dictionary) -> Reconstruct:
    """Any dictionary (``encode``, ``decode``) as a reconstruction of S = 1."""

    def reconstruct(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = dictionary.encode(x)
        return codes.unsqueeze(1), dictionary.decode(codes).unsqueeze(0)

    return reconstruct
