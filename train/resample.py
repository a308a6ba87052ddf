"""Give dead latents a second chance: point them at what the SAE currently fails to reconstruct.

Not in the 2022 report, and off by default: the report's first diagnostic reads which latents
die. With a dictionary no larger than the number of true features, every latent that dies is a
feature that can never be recovered. On today's toy data it changes nothing at the best L1 of a
1x dictionary, because none die there (``make bench``, bench_diagnostics). Recipe, per SAE:
from a pool of many batches (``resample_pool``, a stream apart from training's, so that
hundreds of dead latents get distinct inputs), draw inputs without replacement with probability
proportional to their squared reconstruction error, set each dead latent's atom to the
direction of that input's residual, its encoder column to the same direction scaled to 0.2 x
the mean live encoder norm, its bias to 0, and zero its Adam moments so stale statistics do not
throw it straight back.
"""

from __future__ import annotations

import torch

from unsuperpose.seeding import seeded_generator
from unsuperpose.train.families.stacked import StackedGroup

ENCODER_SCALE = 0.2


def resample_generator(seed: int, step: int, n: int) -> torch.Generator:
    return seeded_generator(seed, step, n, 17)


def _zero_adam(optimizer: torch.optim.Optimizer, param: torch.Tensor, index) -> None:
    state = optimizer.state.get(param)
    if state:
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][index] = 0


@torch.no_grad()
def resample_dead(
    group: StackedGroup,
    pool: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    dead: torch.Tensor,
    gen: torch.Generator,
) -> int:
    """Re-initialise the latents marked in ``dead`` (S, n); returns how many were resampled."""
    if not dead.any():
        return 0
    S, n = group.S, group.n
    _, x_hat = group.reconstruct(pool)
    residual = pool - x_hat  # (S, B, d)
    weights = residual.pow(2).sum(-1)  # (S, B)
    total = 0
    for s in range(S):
        idx = dead[s].nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        # Only inputs with something left to explain give a direction (an all-zero toy sample
        # has none); with fewer of them than dead latents, draw with replacement.
        # Drawn on the CPU with the seeded CPU generator whatever the device: the same rows on
        # a GPU as on the CPU, and resuming stays exact. A resampling step syncs with the host;
        # it comes every resample_every steps, not every step.
        w = weights[s].cpu()
        candidates = int((w > 0).sum())
        if candidates == 0:
            continue
        rows = torch.multinomial(w, len(idx), replacement=len(idx) > candidates, generator=gen).to(
            pool.device
        )
        direction = residual[s, rows]
        direction = direction / direction.norm(dim=1, keepdim=True)
        group.W_dec[s, idx] = direction
        _zero_adam(optimizer, group.W_dec, (s, idx))
        cols = s * n + idx
        if group.W_enc is not None:
            alive = ~dead[s]
            norms = group.W_enc[:, s * n : (s + 1) * n].norm(dim=0)
            scale = ENCODER_SCALE * (norms[alive].mean() if alive.any() else 1.0)
            group.W_enc[:, cols] = direction.T * scale
            _zero_adam(optimizer, group.W_enc, (slice(None), cols))
        group.b_enc[cols] = 0
        _zero_adam(optimizer, group.b_enc, cols)
        group.since_fired[s, idx] = 0
        total += len(idx)
    return total
