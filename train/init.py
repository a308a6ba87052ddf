"""Initial SAE parameters, one dictionary at a time, so a grid and a lone SAE start identically."""

from __future__ import annotations

import math

import torch

from unsuperpose.seeding import seeded_generator


def init_generator(seed: int, d_sae: int) -> torch.Generator:
    """The generator of a dictionary's init: depends on (seed, size) only, so all L1 values of a
    size start from the same point and a lone SAE with the same seed matches its grid twin."""
    return seeded_generator(seed, d_sae)


def init_params(
    d_in: int,
    d_sae: int,
    *,
    seed: int,
    decoder_init: str = "orthogonal",
    encoder_init: str = "transpose",
    tied: bool = False,
    data: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{'W_enc': (d_in, d_sae) or absent when tied, 'b_enc': (d_sae,), 'W_dec': (d_sae, d_in)}.

    ``decoder_init='data'`` uses ``data`` (at least d_sae rows) as the dictionary: the update to
    the report found that starting atoms on real samples speeds up early recovery.
    """
    gen = init_generator(seed, d_sae)
    if decoder_init == "orthogonal":
        w_dec = torch.empty(d_sae, d_in)
        torch.nn.init.orthogonal_(w_dec, generator=gen)
    elif decoder_init == "data":
        if data is None or data.shape[0] < d_sae or data.shape[1] != d_in:
            raise ValueError(f"data init needs at least {d_sae} samples of width {d_in}")
        w_dec = data[:d_sae].clone().float()
        # A zero sample has no direction; give it a random one rather than a NaN.
        zero = w_dec.norm(dim=1) == 0
        if zero.any():
            w_dec[zero] = torch.randn(int(zero.sum()), d_in, generator=gen)
    else:
        raise ValueError(f"unknown decoder_init {decoder_init!r}; use 'orthogonal' or 'data'")
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    params = {"b_enc": torch.zeros(d_sae), "W_dec": w_dec}
    if tied:
        return params
    if encoder_init == "transpose":
        params["W_enc"] = w_dec.T.contiguous()
    elif encoder_init == "kaiming":
        bound = 1 / math.sqrt(d_in)
        params["W_enc"] = torch.empty(d_in, d_sae).uniform_(-bound, bound, generator=gen)
    else:
        raise ValueError(f"unknown encoder_init {encoder_init!r}; use 'transpose' or 'kaiming'")
    return params
