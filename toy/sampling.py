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


def random_groups(G: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """A random partition of the G features into groups of ``group_size`` (the last may be
    smaller): (G,) group index per feature, independent of the features' frequency ranks."""
    n_groups = -(-G // group_size)
    return torch.randperm(G, generator=gen) % n_groups


def copula_normals(n: int, groups: torch.Tensor, correlation: float,
                   gen: torch.Generator, n_groups: int | None = None) -> torch.Tensor:
    """n x G standard normals, correlated ``correlation`` within a group and 0 across groups.

    A random positive correlation matrix of block form: one shared normal per group plus a
    private one per feature. Why blocks and not a normalised Wishart draw: with G = 512 such a
    draw has |rho| ~ 1/sqrt(G) between any two features, which leaves the binary activities
    nearly independent; a block gives each feature a few partners it visibly co-fires with,
    the structure that lets a too-small dictionary merge features (the report's argument for
    MMCS with larger dictionaries). O(n G) per batch, no G x G Cholesky product.
    """
    # Given by callers on a GPU: reading groups.max() every batch would make each batch wait.
    n_groups = int(groups.max()) + 1 if n_groups is None else n_groups
    shared = torch.randn(n, n_groups, generator=gen, device=gen.device)[:, groups]
    private = torch.randn(n, groups.shape[0], generator=gen, device=gen.device)
    return shared.mul_(correlation ** 0.5).add_(private, alpha=(1 - correlation) ** 0.5)


def sample_codes(n: int, probs: torch.Tensor, groups: torch.Tensor | None, correlation: float,
                 gen: torch.Generator, n_groups: int | None = None) -> torch.Tensor:
    """n x G sparse codes: feature i is active with probability probs[i], coefficient U(0, 1).

    With ``correlation`` > 0 the activations are correlated through a Gaussian copula: a
    correlated standard-normal vector per sample (``copula_normals``), mapped through the
    normal CDF to uniforms whose marginals are exactly U(0, 1), so each feature keeps its
    probability and the mean number active stays k.
    """
    G = probs.shape[0]
    if groups is None or correlation == 0:
        u = torch.rand(n, G, generator=gen, device=gen.device)
    else:
        u = torch.special.ndtr(copula_normals(n, groups, correlation, gen, n_groups))
    active = u < probs.float()
    coef = torch.rand(n, G, generator=gen, device=gen.device)
    return coef * active
