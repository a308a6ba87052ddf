"""The SAE loss terms, each with its normalisation spelled out.

loss = reconstruction_mse + l1 * l1_penalty

- reconstruction_mse: mean over the batch AND over the d_in coordinates of the squared error
  (torch's MSELoss default, as in the report's code).
- l1_penalty: mean over the batch of sum_i |c_i|; with ``l1_norm='per_latent'`` also divided by
  the dictionary size, the report's convention (its author later called this a mistake: larger
  dictionaries then get less total penalty, which makes L1 values incomparable across sizes).
"""

from __future__ import annotations

import torch


def reconstruction_mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).mean()


def l1_divisor(l1_norm: str, d_sae: int) -> int:
    if l1_norm == "sum":
        return 1
    if l1_norm == "per_latent":
        return d_sae
    raise ValueError(f"unknown l1_norm {l1_norm!r}; use 'sum' or 'per_latent'")


def l1_penalty(codes: torch.Tensor, l1_norm: str = "sum") -> torch.Tensor:
    return codes.abs().sum(-1).mean() / l1_divisor(l1_norm, codes.shape[-1])
