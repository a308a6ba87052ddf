"""One sparse autoencoder as a plain autograd module: what users load, and the reference the
fast grid trainer is tested against.

Encoder: ReLU(x @ W_enc + b_enc). Decoder: no bias; its rows (the dictionary atoms) are
normalised to unit length on every forward pass, so the L1 penalty cannot be dodged by
shrinking codes and growing atoms.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn

from unsuperpose.config import write_bytes_atomic, write_json_atomic
from unsuperpose.train.init import init_params
from unsuperpose.train.losses import l1_penalty, reconstruction_mse

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


class SAE(nn.Module):
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

    def dictionary(self) -> torch.Tensor:
        """The unit-norm atoms, (d_sae, d_in)."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def renormalise_(self) -> None:
        """Put the raw decoder rows back on the unit sphere; call after every optimiser step.

        The forward pass uses W_dec / ||W_dec|| either way, but Adam's step has a fixed size in
        the raw coordinates, so an atom whose raw norm drifted to r moves by lr / r on the
        sphere: without this, atoms learn at different speeds (see ``SAEGroup.renormalise_``).
        """
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    def encoder_weight(self) -> torch.Tensor:
        return self.dictionary().T if self.tied else self.W_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.encoder_weight() + self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.dictionary()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return self.decode(codes), codes

    def loss(self, x: torch.Tensor, l1: float, l1_norm: str = "sum") -> torch.Tensor:
        x_hat, codes = self(x)
        return reconstruction_mse(x_hat, x) + l1 * l1_penalty(codes, l1_norm)

    # -- storage: safetensors + JSON, never pickles -------------------------------------------
    def save(self, directory: str | Path, config: dict | None = None) -> Path:
        """Write the effective weights (normalised decoder, explicit encoder even when tied)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            tensors = {
                "W_enc": self.encoder_weight().detach().cpu().contiguous(),
                "b_enc": self.b_enc.detach().cpu().contiguous(),
                "W_dec": self.dictionary().detach().cpu().contiguous(),
            }
        write_bytes_atomic(
            directory / WEIGHTS_FILE, safetensors_bytes(tensors)
        )  # a reader never sees half of it
        write_json_atomic(
            directory / CONFIG_FILE,
            {"d_in": self.d_in, "d_sae": self.d_sae, "tied": self.tied, **(config or {})},
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SAE:
        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
            raise FileNotFoundError(
                f"{directory} is not a saved SAE: it needs {WEIGHTS_FILE} and "
                f"{CONFIG_FILE} (written by `unsuperpose toy` / `unsuperpose train`)"
            )
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
        sae = cls(config["d_in"], config["d_sae"], tied=bool(config.get("tied")), params=tensors)
        sae.config = config
        return sae
