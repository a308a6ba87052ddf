"""What the spliced-in evaluation costs per SAE, next to a plain LM forward.

The `tiny` preset's architecture (d_model 16, 6 layers, MLP 64, n_ctx 256) with random weights,
blocks of random tokens (speed does not depend on the weights), SAEs of 8x d at layer 1's MLP.
Tokens/s of: one plain forward with logits; splice_eval with 1 and with 8 SAEs (each SAE costs one
more forward, and the run has three of its own: clean, zero, mean).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from unsuperpose.analyze.splice import splice_eval
from unsuperpose.lm import build_model, load_bridge, preset, save_model
from unsuperpose.train import SAE

HOOK = "blocks.1.mlp.hook_post"


def run() -> list[dict]:
    cfg, _ = preset("tiny")
    folder = tempfile.mkdtemp(prefix="bench-splice-")
    save_model(build_model(cfg, seed=0), folder, lm_config=cfg)
    bridge = load_bridge(folder)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 50_000, cfg.n_ctx) for _ in range(16)]
    tokens = sum(len(b) - 1 for b in blocks)
    x = torch.from_numpy(np.stack(blocks[:4]))
    with torch.no_grad():
        bridge(x)  # warm-up
        t = time.perf_counter()
        for i in range(0, len(blocks), 4):
            bridge(torch.from_numpy(np.stack(blocks[i : i + 4])))
        plain = tokens / (time.perf_counter() - t)
    out = {
        "figure": "splice_cost",
        "model": "tiny preset (random weights)",
        "tokens": tokens,
        "plain_forward_tokens_per_s": round(plain),
    }
    for n in (1, 8):
        saes = {f"s{i}": SAE(cfg.d_mlp, 8 * cfg.d_mlp) for i in range(n)}
        t = time.perf_counter()
        splice_eval(
            bridge,
            HOOK,
            blocks,
            {k: (lambda v, s=s: s(v)[0]) for k, s in saes.items()},
            mean=torch.zeros(cfg.d_mlp),
            progress=False,
        )
        out[f"splice_{n}_sae_s"] = round(time.perf_counter() - t, 2)
    per_sae = (out["splice_8_sae_s"] - out["splice_1_sae_s"]) / 7
    out["per_sae_tokens_per_s"] = round(tokens / per_sae) if per_sae > 0 else None
    out["per_sae_vs_plain_forward"] = round(plain * per_sae / tokens, 2) if per_sae > 0 else None
    return [out]
