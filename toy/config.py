"""The toy data's parameters, checked once so every later step can trust them."""

from __future__ import annotations

from dataclasses import dataclass

from unsuperpose.config import field


@dataclass(frozen=True)
class ToyConfig:
    """Synthetic activations with known ground-truth features (Sharkey et al. 2022)."""

    h: int = field(256, help="width of each activation vector (the report: 256)")
    G: int = field(512, help="number of ground-truth features (the report: 512)")
    k: float = field(5.0, help="expected number of active features per sample (the report: 5)")
    decay: float = field(0.99, help="feature i is active with probability proportional to decay**i")
    correlated: bool = field(True, help="correlate feature activations through a Gaussian copula")
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
        if self.noise < 0:
            problems.append(f"noise must be >= 0 (got {self.noise})")
        if problems:
            raise ValueError("invalid toy data settings: " + "; ".join(problems))
