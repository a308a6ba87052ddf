"""Pure functions of the step number: the learning rate and which blocks form each batch.

Both depend only on (step, config), never on state carried from step to step, so a resumed run
reproduces an uninterrupted one exactly without saving iterator or scheduler objects.
"""

from __future__ import annotations

import math

import numpy as np

from unsuperpose.lm.config import TrainLMConfig


def total_steps(cfg: TrainLMConfig, n_ctx: int) -> int:
    """Optimizer steps that the token budget buys (at least one)."""
    return max(1, cfg.tokens // (cfg.batch_size * n_ctx))


def lr_at(step: int, steps: int, cfg: TrainLMConfig) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of steps, then cosine.

    The cosine decays to ``min_lr_fraction``.
    """
    warmup = round(cfg.warmup_fraction * steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class BlockOrder:
    """Which training blocks make up batch ``step``: each epoch is a fresh seeded permutation.

    Batches are consecutive runs of the infinite sequence epoch 0's permutation, epoch 1's, ...;
    a batch may straddle two epochs, and no block repeats within an epoch.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            }
        return self._perms[epoch]

    def batch(self, step: int) -> np.ndarray:
        first = step * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        epochs, offsets = np.divmod(positions, self.n_blocks)
        return np.concatenate([self._perm(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n_blocks
