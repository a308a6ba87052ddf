"""The toy data's parameters, checked once so every later step can trust them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unsuperpose.config import field


@dataclass(frozen=True)
class ToyConfig:
    """Synthetic activations with known ground-truth features (Sharkey et al. 2022)."""

    h: int = field(256, help="width of each activation vector (the report: 256)")
    G: int = field(512, help="number of ground-truth features (the report: 512)")
    k: float = field(5.0, help="expected number of active features per sample (the report: 5)")
    decay: float = field(0.99, help="feature i is active with probability proportional to decay**i")
    correlation: float = field(
        0.5,
        help="correlation of the copula's normals within a group of "
        "features (0: independent features). 0.5 makes a feature ~8x more "
        "likely to fire when another of its group fires (G 512, k 5)",
    )
    correlation_recipe: Literal["threshold", "report"] = field(
        "threshold",
        help="how the correlated normals turn features on: 'report' = the report's "
        "recipe (Bernoulli with probability 2 p_i Phi(z_i): weak coupling, ~1.2x at 0.5); "
        "'threshold' = on when Phi(z_i) < p_i (a Gaussian copula on the indicators: ~5-30x at "
        "0.5). See the README for why the default deviates",
    )
    group_size: int = field(
        8,
        help="features per correlated group; groups are a random partition "
        "of the features, fixed by the seed",
    )
    frequencies: Literal["decay", "zipf"] = field(
        "decay",
        help="how often each feature fires: 'decay' = proportional to decay**i, scaled so k are "
        "active on average (the report); 'zipf' = Zipfian after SynthSAEBench (Chanin & "
        "Garriga-Alonso 2026): from p_max down to p_min with exponent zipf_exponent, so "
        "k and decay are unused (see the README)",
    )
    zipf_exponent: float = field(0.5, help="--frequencies zipf: the exponent (SynthSAEBench: 0.5)")
    p_max: float = field(0.4, help="--frequencies zipf: the commonest feature's probability")
    p_min: float = field(5e-4, help="--frequencies zipf: the rarest feature's probability")
    correlation_structure: Literal["blocks", "lowrank"] = field(
        "blocks",
        help="the copula's correlation matrix: 'blocks' = --correlation within random groups of "
        "--group-size; 'lowrank' = SynthSAEBench's F F^T + diag(1 - |F_i|^2), F a G x "
        "--lowrank-rank matrix of N(0, --lowrank-scale^2) entries (correlation and group_size "
        "are then unused)",
    )
    lowrank_rank: int = field(25, help="--correlation-structure lowrank: rank (SynthSAEBench: 25)")
    lowrank_scale: float = field(
        0.1, help="--correlation-structure lowrank: std of the factor's entries (SynthSAEBench 0.1)"
    )
    hierarchy: bool = field(
        False,
        help="arrange the commonest features as trees after SynthSAEBench: a child fires only "
        "with its parent, at most one sibling fires, and a child's coefficient is scaled by its "
        "parent's. Deviations: one draw per sibling group picks the child, so each marginal is "
        "exactly its parent's times its conditional probability, and siblings whose targets "
        "outweigh their parent share its rate in their targets' proportions; children are "
        "drawn apart from the copula, which drives roots and free features (README, 'Features "
        "in trees')",
    )
    hierarchy_roots: int = field(
        4,
        help="--hierarchy: number of trees; they take features 0, 1, ... (the commonest) "
        "breadth-first until G runs out. 4 trees of branching 4, depth 3 hold 340 of 512 "
        "features, SynthSAEBench-16k's share (128 roots over 16,384)",
    )
    hierarchy_branching: int = field(
        4, help="--hierarchy: children per parent (SynthSAEBench: 4; it also allows a random range)"
    )
    hierarchy_depth: int = field(
        3, help="--hierarchy: levels below a root (SynthSAEBench: 3; 1 = roots and leaves)"
    )
    noise: float = field(0.0, help="std of isotropic Gaussian noise added to each sample")
    seed: int = field(0, help="seed of the features, probabilities and covariance")

    def __post_init__(self) -> None:
        problems = []
        if self.h < 1:
            problems.append(f"h must be >= 1 (got {self.h})")
        if self.G < 1:
            problems.append(f"G must be >= 1 (got {self.G})")
        if not 0 < self.k <= self.G:
            problems.append(f"k must be in (0, G={self.G}] (got {self.k})")
        if not 0 < self.decay <= 1:
            problems.append(f"decay must be in (0, 1] (got {self.decay})")
        if not 0 <= self.correlation < 1:
            problems.append(f"correlation must be in [0, 1) (got {self.correlation})")
        if not 1 <= self.group_size <= self.G:
            problems.append(f"group_size must be in [1, G={self.G}] (got {self.group_size})")
        if self.correlation_recipe not in ("threshold", "report"):
            problems.append(
                f"correlation_recipe must be 'threshold' or 'report' (got "
                f"{self.correlation_recipe!r})"
            )
        if self.frequencies not in ("decay", "zipf"):
            problems.append(f"frequencies must be 'decay' or 'zipf' (got {self.frequencies!r})")
        if not 0 < self.p_min <= self.p_max <= 1:
            problems.append(
                f"p_min and p_max must satisfy 0 < p_min <= p_max <= 1 (got {self.p_min}, "
                f"{self.p_max})"
            )
        if not self.zipf_exponent > 0:
            problems.append(f"zipf_exponent must be > 0 (got {self.zipf_exponent})")
        if self.correlation_structure not in ("blocks", "lowrank"):
            problems.append(
                f"correlation_structure must be 'blocks' or 'lowrank' (got "
                f"{self.correlation_structure!r})"
            )
        if self.lowrank_rank < 1:
            problems.append(f"lowrank_rank must be >= 1 (got {self.lowrank_rank})")
        if self.lowrank_scale < 0:
            problems.append(f"lowrank_scale must be >= 0 (got {self.lowrank_scale})")
        if self.hierarchy_roots < 1:
            problems.append(f"hierarchy_roots must be >= 1 (got {self.hierarchy_roots})")
        if self.hierarchy_branching < 2:
            problems.append(f"hierarchy_branching must be >= 2 (got {self.hierarchy_branching})")
        if self.hierarchy_depth < 1:
            problems.append(f"hierarchy_depth must be >= 1 (got {self.hierarchy_depth})")
        if self.noise < 0:
            problems.append(f"noise must be >= 0 (got {self.noise})")
        if problems:
            raise ValueError("invalid toy data settings: " + "; ".join(problems))
