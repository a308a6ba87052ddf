"""One sparse autoencoder as a plain autograd module: what users load, and the reference the
fast grid trainer is tested against.

Encoder: ReLU(x @ W_enc + b_enc). Decoder: no bias; its rows (the dictionary atoms) are
normalised to unit length on every forward pass, so the L1 penalty cannot be dodged by
shrinking codes and growing atoms.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from unsuperpose.train.dictionary import WEIGHTS_FILE, StoredDictionary, read_config
from unsuperpose.train.init import init_params
from unsuperpose.train.losses import l1_penalty, reconstruction_mse


class SAE(StoredDictionary):
    """The ``relu`` architecture's dictionary: a ``StoredDictionary`` whose saved tensors are its
    effective weights (unit-norm decoder, an explicit encoder even when tied), so that it reads
    back, and exports, as any other dictionary."""

    arch = "relu"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        tied: bool = False,
        params: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.d_in, self.d_sae, self.tied = d_in, d_sae, tied
        if params is None:  # a fresh SAE starts as a grid's would with seed 0
            params = init_params(d_in, d_sae, seed=0, tied=tied)
        self.W_dec = nn.Parameter(params["W_dec"].clone())
        self.b_enc = nn.Parameter(params["b_enc"].clone())
        self.W_enc = None if tied else nn.Parameter(params["W_enc"].clone())
        self.config: dict = {}

    def dictionary(self) -> torch.Tensor:
        """The unit-norm atoms, (d_sae, d_in)."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def renormalise_(self) -> None:
        """Put the raw decoder rows back on the unit sphere; call after every optimiser step.

        The forward pass uses W_dec / ||W_dec|| either way, but Adam's step has a fixed size in
        the raw coordinates, so an atom whose raw norm drifted to r moves by lr / r on the
        sphere: without this, atoms learn at different speeds (the grid trainer does the same:
        ``StackedGroup.post_step``).
        """
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    def atoms(self) -> torch.Tensor:
        return self.dictionary()

    def encoder_weight(self) -> torch.Tensor:
        return self.dictionary().T if self.tied else self.W_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.encoder_weight() + self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.dictionary()

    def loss(self, x: torch.Tensor, l1: float, l1_norm: str = "sum") -> torch.Tensor:
        x_hat, codes = self(x)
        return reconstruction_mse(x_hat, x) + l1 * l1_penalty(codes, l1_norm)

    # -- storage: safetensors + JSON, never pickles (StoredDictionary.save) -------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The effective weights: the normalised decoder, an explicit encoder even when tied."""
        with torch.no_grad():
            return {"W_enc": self.encoder_weight(), "b_enc": self.b_enc, "W_dec": self.dictionary()}

    def identity(self) -> dict:
        return {**super().identity(), "tied": self.tied}

    @classmethod
    def load(cls, directory: str | Path) -> SAE:
        config = read_config(directory)
        tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
        sae = cls(config["d_in"], config["d_sae"], tied=bool(config.get("tied")), params=tensors)
        sae.config = config
        return sae
