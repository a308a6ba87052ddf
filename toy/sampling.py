"""Pure functions that make the toy data: features, activation probabilities, samples.

Two ways to correlate which features are on (``ToyConfig.correlation_recipe``):

- ``report``, the report's description: per sample, one correlated standard-normal vector z,
  pushed through the normal CDF, multiplied by the decaying probabilities and rescaled so that on
  average k features are on; then each feature is on with that probability (a Bernoulli draw).
  Since E[Phi(z_i)] = 1/2, the rescaling is a factor 2: feature i is on with probability
  2 p_i Phi(z_i), exact while every p_i <= 1/2. Its coupling is weak: at within-group
  correlation 0.5 a feature is only ~1.2x more likely to fire when a partner fires.
- ``threshold`` (our default): the same correlated z, but feature i is on exactly when
  Phi(z_i) < p_i, a Gaussian copula on the on/off indicators. The marginals are still p_i, and
  the coupling is far stronger (a partner firing lifts a feature's rate ~5-30x at 0.5). We use
  it because on the report's recipe a small dictionary learns clean common features rather than
  mixtures, so "MMCS with larger dictionaries" points below the truth (README: "The count,
  whichever grid you draw", where both are compared).

The covariance is the same in both: the report only says "random"; we use blocks (below), or
SynthSAEBench's low-rank matrix (``lowrank_factor``). With ``ToyConfig.hierarchy`` the copula
draws the roots and the free features; children are drawn given their parents (``hierarchy``).
Where the public replication differs from the description, both recipes follow the description:
- one correlated normal draw per datapoint (the replication drew one per batch, so every sample
  in a batch shared its correlation pattern);
- one U(0, 1) coefficient per active feature (the replication multiplied two uniforms);
- probabilities rescaled so the expected number of active features is exactly k, clipping at 1
  and rescaling again until it holds, in the correlated and uncorrelated modes alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from unsuperpose.toy.hierarchy import Forest, draw_children, scale_children

RECIPES = ("threshold", "report")


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


def zipf_probabilities(G: int, exponent: float, p_max: float, p_min: float) -> torch.Tensor:
    """p_i from p_max (i = 0) down to p_min (i = G - 1) with a Zipfian shape:
    p_i = p_min + (p_max - p_min) * ((i + 1)^-a - G^-a) / (1 - G^-a).

    Our reading of SynthSAEBench's "Zipfian, exponent 0.5, p_max 0.4, p_min 5e-4": a plain
    p_max * (i + 1)^-a reaches p_min only at G = (p_max / p_min)^(1/a) features (640,000 for
    theirs), so the Zipf curve is mapped affinely onto [p_min, p_max] for any G.
    """
    ranks = np.arange(1, G + 1, dtype=np.float64) ** -exponent
    tail = float(G) ** -exponent
    shape = (ranks - tail) / (1 - tail) if G > 1 else np.ones(1)
    return torch.from_numpy(p_min + (p_max - p_min) * shape)


def random_groups(G: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """A random partition of the G features into groups of ``group_size`` (the last may be
    smaller): (G,) group index per feature, independent of the features' frequency ranks."""
    n_groups = -(-G // group_size)
    return torch.randperm(G, generator=gen) % n_groups


def copula_normals(
    n: int,
    groups: torch.Tensor,
    correlation: float,
    gen: torch.Generator,
    n_groups: int | None = None,
) -> torch.Tensor:
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
    return shared.mul_(correlation**0.5).add_(private, alpha=(1 - correlation) ** 0.5)


def lowrank_factor(
    G: int, rank: int, scale: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """SynthSAEBench's low-rank correlation: the copula's normals have correlation matrix
    F F^T + diag(1 - |F_i|^2), F a G x rank matrix of N(0, scale^2) entries. Returns F and each
    feature's private standard deviation sqrt(1 - |F_i|^2) (float32, for ``lowrank_normals``).

    As there, a feature must keep at least 1% private variance: if a row's squared norm would
    pass 0.99, the whole of F is scaled down until none does. O(n G rank) per batch, no G x G
    matrix, so it scales to any G.
    """
    f = torch.randn(G, rank, generator=gen, dtype=torch.float64) * scale
    shared = (f**2).sum(1)
    if float(shared.max()) > 0.99:
        f *= (0.99 / shared.max()).sqrt()
        shared = (f**2).sum(1)
    return f.float(), (1 - shared).sqrt().float()


def lowrank_normals(
    n: int, factor: torch.Tensor, private_sd: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """n x G standard normals with correlation F F^T + diag(private_sd^2) (``lowrank_factor``):
    rank shared normals through F plus a private normal per feature."""
    z = torch.randn(n, factor.shape[1], generator=gen, device=gen.device) @ factor.T
    private = torch.randn(n, factor.shape[0], generator=gen, device=gen.device)
    return z.addcmul_(private, private_sd)


def sample_codes(
    n: int,
    probs: torch.Tensor,
    groups: torch.Tensor | None,
    correlation: float,
    gen: torch.Generator,
    n_groups: int | None = None,
    recipe: str = "threshold",
    *,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
    forest: Forest | None = None,
) -> torch.Tensor:
    """n x G sparse codes: feature i is active with probability probs[i], coefficient U(0, 1).

    With ``correlation`` > 0 the activations are correlated through ``recipe`` (module
    docstring), driven by a correlated standard-normal vector per sample (``copula_normals``, or
    ``lowrank_normals`` when ``lowrank`` gives its factor, which then replaces the blocks);
    either way each feature keeps its probability and the mean number active stays k. Without
    correlation both recipes are independent Bernoulli draws (the same draws). ``forest``: the
    children's columns are then drawn given their parents and scaled by them (``hierarchy``);
    ``probs`` must hold the forest's marginals, of which only the roots' and free features'
    are read here.
    """
    G = probs.shape[0]
    if lowrank is None and (groups is None or correlation == 0):
        u = torch.rand(n, G, generator=gen, device=gen.device)
        active = u < probs.float()
    elif recipe not in RECIPES:
        raise ValueError(f"unknown correlation recipe {recipe!r}; choose one of {RECIPES}")
    else:
        z = (
            copula_normals(n, groups, correlation, gen, n_groups)
            if lowrank is None
            else lowrank_normals(n, *lowrank, gen)
        )
        if recipe == "threshold":
            active = torch.special.ndtr(z) < probs.float()
        else:
            scaled = torch.special.ndtr(z)
            scaled.mul_(2 * probs.float())
            active = torch.rand(n, G, generator=gen, device=gen.device) < scaled
    if forest is not None:
        active = draw_children(active, forest, gen)
    coef = torch.rand(n, G, generator=gen, device=gen.device)
    codes = coef * active
    return codes if forest is None else scale_children(codes, forest)


def dead_window_for(
    probs: torch.Tensor, batch_size: int, *, fire_fraction: float = 0.5, miss: float = 1e-3
) -> int:
    """Batches a latent that has learnt the rarest feature can go without firing by chance with
    probability at most ``miss``: the toy data's dead window, derived from its firing rates.

    Such a latent fires when the feature is on and its coefficient clears the latent's threshold;
    ``fire_fraction`` of the U(0, 1) coefficients is taken to clear it (a threshold at the median).
    """
    rate = float(probs.min()) * fire_fraction
    silent_per_batch = batch_size * -math.log1p(-rate)
    return max(1, math.ceil(math.log(1 / miss) / silent_per_batch))
