"""Features arranged as trees, after SynthSAEBench (Chanin & Garriga-Alonso 2026): who is whose
parent, how often a child fires given its parent, and the draw that enforces it.

- The trees take the features in index order, breadth-first: roots 0..R-1 (the commonest
  features under either ``frequencies``), then each node's children in turn, until G runs out;
  the features left over stay free (drawn as without a hierarchy).
- Every feature has a target rate p_i (``ToyConfig.frequencies``). When its parent fires, child j
  fires with q_j = p_j / P_parent, where P_parent is the parent's true marginal, and at most one
  sibling fires (one uniform per sibling group falls into one child's interval, or into none).
  So P_child = P_parent q_j exactly, and ``forest_probabilities`` returns those marginals.
- Siblings whose targets outweigh their parent (sum of q_j > 1) are scaled to sum to 1: the
  parent then always carries one child, shared in their targets' proportions. With Zipfian
  frequencies (exponent 1/2) and branching b this is the rule rather than the exception: a
  node's children sit near b times its rank, each at about 1/sqrt(b) of its rate.
- A child's coefficient is its own U(0, 1) draw times its parent's coefficient over 1/2 (the
  mean of a coefficient), level by level, so every level keeps mean 1/2 and a child is large
  when its parent is.

Children are drawn apart from the copula on purpose: a child correlated with its parent through
the copula would fire more or less often than P_parent q_j, and the ground truth would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

COEF_MEAN = 0.5  # the mean of a U(0, 1) coefficient: a child's scale is its parent's over this


@dataclass(frozen=True)
class Level:
    """The features at one depth below the roots: a contiguous index range (breadth-first)."""

    start: int
    stop: int
    parents: torch.Tensor  # (stop - start,) each feature's parent
    groups: torch.Tensor  # (stop - start,) its sibling group: which uniform picks among them
    lo: torch.Tensor  # (stop - start,) float32: the child fires when lo <= its group's u < hi
    hi: torch.Tensor


@dataclass(frozen=True)
class Forest:
    parent: torch.Tensor  # (G,) each feature's parent, -1 for roots and free features
    depth: torch.Tensor  # (G,) 0 for roots, -1 for free features
    levels: tuple[Level, ...]
    n_groups: int  # sibling groups, one per feature with children

    def to(self, device: torch.device | str) -> Forest:
        moved = tuple(
            replace(lv, **{k: getattr(lv, k).to(device) for k in ("parents", "groups", "lo", "hi")})
            for lv in self.levels
        )
        return replace(self, levels=moved)


def forest_parents(G: int, roots: int, branching: int, depth: int) -> tuple[np.ndarray, list]:
    """(G,) parent index (-1: root or free) and each level's (start, stop), built breadth-first."""
    parent = np.full(G, -1, dtype=np.int64)
    frontier = list(range(min(roots, G)))
    nxt, levels = len(frontier), []
    for _ in range(depth):
        start, children = nxt, []
        for p in frontier:
            take = min(branching, G - nxt)
            parent[nxt : nxt + take] = p
            children += range(nxt, nxt + take)
            nxt += take
        if not children:
            break
        levels.append((start, nxt))
        frontier = children
    return parent, levels


def build_forest(
    G: int, roots: int, branching: int, depth: int, targets: torch.Tensor
) -> tuple[Forest, torch.Tensor]:
    """The trees and every feature's true firing probability (float64, G) given ``targets``."""
    parent, ranges = forest_parents(G, roots, branching, depth)
    p = targets.double().numpy()
    marginal = p.copy()
    has_children = np.zeros(G, dtype=bool)
    has_children[parent[parent >= 0]] = True
    group_of = np.cumsum(has_children) - 1  # a parent's sibling group
    node_depth = np.full(G, -1, dtype=np.int64)
    node_depth[: min(roots, G)] = 0
    levels = []
    for d, (start, stop) in enumerate(ranges, 1):
        kids = np.arange(start, stop)
        par = parent[kids]
        node_depth[kids] = d
        q = p[kids] / marginal[par]
        total = np.bincount(par, weights=q, minlength=G)[par]
        q = q / np.maximum(total, 1.0)
        marginal[kids] = marginal[par] * q
        # siblings are contiguous: each one's interval starts where the previous one's ends, so
        # the float32 intervals tile [0, sum q) without a gap or an overlap
        first = np.r_[True, par[1:] != par[:-1]]
        hi = np.cumsum(q)
        hi -= (hi - q)[np.maximum.accumulate(np.where(first, np.arange(len(q)), 0))]
        lo = np.where(first, 0.0, np.r_[0.0, hi[:-1]])
        levels.append(
            Level(
                start,
                stop,
                torch.from_numpy(par),
                torch.from_numpy(group_of[par]),
                torch.from_numpy(lo).float(),
                torch.from_numpy(hi).float(),
            )
        )
    n_groups = int(has_children.sum())
    forest = Forest(torch.from_numpy(parent), torch.from_numpy(node_depth), tuple(levels), n_groups)
    return forest, torch.from_numpy(marginal)


def draw_children(active: torch.Tensor, forest: Forest, gen: torch.Generator) -> torch.Tensor:
    """Overwrite the children's columns of ``active`` (n x G, bool) level by level: a child is on
    when its parent is and its sibling group's uniform falls in its interval."""
    u = torch.rand(active.shape[0], forest.n_groups, generator=gen, device=gen.device)
    for lv in forest.levels:
        pick = u[:, lv.groups]
        active[:, lv.start : lv.stop] = active[:, lv.parents] & (pick >= lv.lo) & (pick < lv.hi)
    return active


def scale_children(codes: torch.Tensor, forest: Forest) -> torch.Tensor:
    """Each child's coefficient times its parent's (already scaled) over ``COEF_MEAN``, top down."""
    for lv in forest.levels:
        codes[:, lv.start : lv.stop] *= codes[:, lv.parents] / COEF_MEAN
    return codes
