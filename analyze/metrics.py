"""The report's measures, as pure functions on dictionaries (rows = unit-norm atoms) and grids.

- MMCS(A, B): for each atom of the reference A, its best cosine with any atom of B, averaged.
  Not symmetric: with A the ground truth it asks "was every true feature found?".
- MCC: one-to-one matching of atoms (Hungarian algorithm) maximising total cosine, averaged
  over the reference's atoms, an unmatched one scoring 0 (so a dictionary smaller than the
  truth cannot score 1). Unlike MMCS, one learned atom cannot explain two true features.
- MMCS with larger dictionaries: for each (L1, size), MMCS of its dictionary against every larger
  dictionary trained at the same L1, averaged (the report's proxy for "features found" when no
  ground truth exists).
- SSLL ("loss stickiness"): log reconstruction loss and log L1 loss, each standardised (z-score)
  over the whole grid, then summed. Cells whose log is undefined (a loss of 0) are left out of
  the standardisation and get NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _unit(d: torch.Tensor | np.ndarray) -> torch.Tensor:
    d = torch.as_tensor(d, dtype=torch.float32)
    if d.ndim != 2:
        raise ValueError(
            f"a dictionary is a 2-D (atoms x width) matrix, got shape {tuple(d.shape)}"
        )
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a, b) -> torch.Tensor:
    a, b = _unit(a), _unit(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"dictionaries of different widths ({a.shape[1]} vs {b.shape[1]}) cannot be compared"
        )
    return a @ b.T


def mmcs(reference, other) -> float:
    """Mean over ``reference``'s atoms of the max cosine similarity with ``other``'s atoms."""
    return float(cosine_matrix(reference, other).max(dim=1).values.mean())


def mcc(reference, other) -> float:
    """Best one-to-one matching's summed cosine / the number of ``reference`` atoms: with fewer
    atoms in ``other``, the reference atoms left unmatched count 0, as MMCS counts every one."""
    cos = cosine_matrix(reference, other).double().cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].sum() / cos.shape[0])


def mmcs_with_larger(
    dicts: dict[tuple[float, int], torch.Tensor],
) -> dict[tuple[float, int], float]:
    """{(l1, n): mean MMCS against the larger dictionaries at the same L1} (NaN for the largest)."""
    out = {}
    for (l1, n), d in dicts.items():
        larger = [dicts[(a, m)] for (a, m) in dicts if a == l1 and m > n]
        out[(l1, n)] = float(np.mean([mmcs(d, big) for big in larger])) if larger else math.nan
    return out


def _standardised_log(values: dict) -> dict:
    logs = {
        k: math.log(v) if v is not None and v > 0 and math.isfinite(v) else math.nan
        for k, v in values.items()
    }
    finite = np.array([v for v in logs.values() if math.isfinite(v)])
    if len(finite) == 0:
        return {k: math.nan for k in logs}
    mean, std = finite.mean(), finite.std()
    return {
        k: (v - mean) / std
        if std > 0 and math.isfinite(v)
        else (0.0 if math.isfinite(v) else math.nan)
        for k, v in logs.items()
    }


def ssll(recon: dict, l1: dict) -> dict:
    """Summed standardised log losses over a grid: {key: z(log recon) + z(log l1)}."""
    zr, zl = _standardised_log(recon), _standardised_log(l1)
    return {k: zr[k] + zl[k] for k in recon}
