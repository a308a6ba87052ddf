"""Pure functions that make the toy data: features, activation probabilities, samples.

Where the public replication of the report differs from the report's description, we follow
the description:
- one correlated normal draw per datapoint (the replication drew one per batch, so every sample
  in a batch shared its correlation pattern);
- one U(0, 1) coefficient per active feature (the replication multiplied two uniforms);
- probabilities rescaled so the expected number of active features is exactly k, clipping at 1
  and rescaling again until it holds, in the correlated and uncorrelated modes alike.
"""

from __future__ import annotations

import numpy as np
import torch


def unit_features(G: int, h: int, gen: torch.Generator) -> torch.Tensor:
    """G directions drawn uniformly on the unit sphere in R^h (rows of a G x h matrix)."""
    f = torch.randn(G, h, generator=gen, dtype=torch.float64)
    return (f / f.norm(dim=1, keepdim=True)).float()


def feature_probabilities(G: int, k: float, decay: float) -> torch.Tensor:
    """p_i proportional to decay**i, scaled so sum(p) == k with every p_i <= 1.

    Scaling can push the most frequent features above 1; those are clipped to 1 and the rest
    rescaled to make up the difference, repeated until nothing exceeds 1 (water-filling).
    """
    p = decay ** np.arange(G, dtype=np.float64)
    fixed = np.zeros(G, dtype=bool)
    for _ in range(G + 1):
        free_mass = k - fixed.sum()
        p = np.where(fixed, 1.0, p * free_mass / p[~fixed].sum())
        over = (p > 1.0) & ~fixed
        if not over.any():
            break
        fixed |= over
    return torch.from_numpy(np.minimum(p, 1.0))


def random_correlation_cholesky(G: int, gen: torch.Generator) -> torch.Tensor:
    """Cholesky factor of a random, fixed correlation matrix (a normalised Wishart draw)."""
    a = torch.rand(G, G, generator=gen, dtype=torch.float64) * 2 - 1
    cov = a @ a.T + 1e-3 * torch.eye(G, dtype=torch.float64)
    d = cov.diagonal().rsqrt()
    corr = cov * d[:, None] * d[None, :]
    return torch.linalg.cholesky(corr).float()


def sample_codes(n: int, probs: torch.Tensor, chol: torch.Tensor | None,
                 gen: torch.Generator) -> torch.Tensor:
    """n x G sparse codes: feature i is active with probability probs[i], coefficient U(0, 1).

    With ``chol`` the activations are correlated through a Gaussian copula: a correlated
    standard-normal vector per sample, mapped through the normal CDF to uniforms whose
    marginals are exactly U(0, 1), so each feature keeps its probability.
    """
    G = probs.shape[0]
    if chol is None:
        u = torch.rand(n, G, generator=gen)
    else:
        z = torch.randn(n, G, generator=gen) @ chol.T
        u = torch.special.ndtr(z)
    active = u < probs.float()
    coef = torch.rand(n, G, generator=gen)
    return coef * active
