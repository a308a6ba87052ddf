"""Seeded random streams: every random draw of a run is a function of a key, never of global
state, which is what makes runs resume exactly (toy data and training share this)."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` determined by ``key`` alone."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)
