"""Export a dictionary in SAELens's on-disk format, so SAELens users can load what we trained.

A folder with ``cfg.json`` and ``sae_weights.safetensors`` holding W_enc (d_in x d_sae), b_enc,
W_dec (d_sae x d_in) and b_dec (d_in), float32; architecture "standard". SAELens encodes
ReLU((x - b_dec) @ W_enc + b_enc) and decodes f @ W_dec + b_dec; our decoder has no bias, so
b_dec is zeros and both formulas reduce to ours exactly. ``SAE.load_from_disk(folder)`` in
sae-lens 6 reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from unsuperpose.config import write_bytes_atomic, write_json_atomic
from unsuperpose.train.sae import SAE

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"


def export_saelens(sae: SAE, directory: str | Path, *, metadata: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        tensors = {
            "W_enc": sae.encoder_weight().detach().float().cpu().contiguous(),
            "b_enc": sae.b_enc.detach().float().cpu().contiguous(),
            "W_dec": sae.dictionary().detach().float().cpu().contiguous(),
            "b_dec": torch.zeros(sae.d_in),
        }
    write_bytes_atomic(directory / WEIGHTS, safetensors_bytes(tensors))
    write_json_atomic(
        directory / CONFIG,
        {
            "d_in": sae.d_in,
            "d_sae": sae.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "architecture": "standard",
            "metadata": {"exported_by": "unsuperpose", **(metadata or {})},
        },
    )
    return directory
