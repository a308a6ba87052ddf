"""``relu``: the 2022 report's SAE, ReLU(x @ W_enc + b_enc) with an L1 penalty; the default.

Sharkey, Braun & Millidge (2022), "Taking features out of superposition with sparse
autoencoders", and Cunningham et al. (2023) for the tied option. No decoder bias (the report's
layout); the decoder rows are unit-normalised in every forward pass.

Loss of SAE s: mean((x_hat - x)^2) over the batch AND the d coordinates (torch's MSELoss
default, as in the report's code) + l1_s * mean_batch(sum_i c_i), the latter divided by the
dictionary size in the report's ``per_latent`` convention (``train.losses``).

Two groups train it and must agree: ``ReluGroup`` here (autograd, the reference) and
``ReluFastGroup`` (the hand-written backward with the sparse CSR path, what the trainer uses).
"""

from __future__ import annotations

import torch

from unsuperpose.train.families.stacked import StackedGroup
from unsuperpose.train.knobs import L1
from unsuperpose.train.losses import l1_divisor
from unsuperpose.train.registry import Family, SAELens, register
from unsuperpose.train.sae import SAE


class ReluGroup(StackedGroup):
    arch = "relu"
    decoder_bias = False
    dictionary_class = SAE

    def init_extra(self) -> dict[str, torch.Tensor]:
        coef = torch.tensor(self.values, dtype=torch.float32)
        self.l1_coef = (coef / l1_divisor(self.config.l1_norm, self.n)).to(self.device)
        return {}

    @property
    def l1(self) -> list[float]:
        return self.values

    def codes(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        return torch.relu(pre)

    def recon_loss(self, err: torch.Tensor) -> torch.Tensor:
        return err.pow(2).mean(dim=(1, 2))

    def extra_loss(self, x, pre, codes, x_hat, err, dn) -> torch.Tensor:
        return self.l1_coef * codes.sum(-1).mean(0)

    def dictionary(self, s: int) -> SAE:
        with torch.no_grad():
            params = self.dictionary_tensors(s, self.dictionaries())
        return SAE(self.d, self.n, tied=self.tied, params=params)


RELU = register(
    Family(
        name="relu",
        knob=L1,
        group=ReluGroup,
        dictionary=SAE,
        # its own: the report's L1 convention, the tied encoder, the fast path's sparse backward
        settings=("tied", "l1_norm", "sparse_below"),
        saelens=SAELens("standard"),
        source="Sharkey et al. 2022 (the report), tied option from Cunningham et al. 2023",
    )
)
