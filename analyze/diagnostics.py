"""Where each of the report's three diagnostics points in an (L1 x dictionary size) grid.

Pure functions of {(l1, size): value} dicts, so they can be tested on constructed grids:

- dead neurons: at each L1, the largest dictionary with no dead latents. Past the number of
  features there are to find, extra latents have nothing to learn and die, so that size bounds
  the number of features from below. One size for the whole grid is the median over the L1 values
  whose boundary lies inside the grid (smaller sizes alive, a larger one dead).
- loss stickiness: the cell where the summed standardised log losses (SSLL) peak.
- MMCS with larger dictionaries: the cell whose features keep reappearing in every larger
  dictionary at the same L1, i.e. where that MMCS peaks.

With ground truth (toy data) the optimum is the cell with the best MMCS with the true features;
each diagnostic is then scored against it. Without (an LM), the sizes the diagnostics point to
are the estimate of the number of features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Key = tuple[float, int]


def _finite(values: dict[Key, float]) -> dict[Key, float]:
    return {k: float(v) for k, v in values.items()
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v)}


def peak(values: dict[Key, float]) -> Key | None:
    """The cell with the largest finite value (ties: the smaller dictionary, then smaller L1)."""
    vals = _finite(values)
    if not vals:
        return None
    return max(vals, key=lambda k: (vals[k], -k[1], -k[0]))


def largest_alive(dead: dict[Key, float], tolerance: float = 0.0) -> dict[float, int | None]:
    """Per L1: the largest size whose dead latents are at most ``tolerance`` x its size, among
    sizes all of whose smaller siblings are alive too (None: even the smallest has dead ones).

    Requiring every smaller size alive keeps one noisy small dictionary from moving the boundary
    past a size that has already lost latents.
    """
    out: dict[float, int | None] = {}
    for a in sorted({k[0] for k in dead}):
        best = None
        for n in sorted(k[1] for k in dead if k[0] == a):
            if dead[(a, n)] <= tolerance * n:
                best = n
            else:
                break
        out[a] = best
    return out


@dataclass
class DeadBoundary:
    per_l1: dict[float, int | None]
    size: int | None           # median of the boundaries inside the grid
    inside: list[float]        # L1 values whose boundary is inside the grid
    all_alive: list[float]     # L1 values where even the largest dictionary has no dead latent
    none_alive: list[float]    # L1 values where even the smallest has dead latents


def dead_boundary(dead: dict[Key, float], tolerance: float = 0.0) -> DeadBoundary:
    """``largest_alive`` per L1, and one size for the grid (None if no boundary is inside it)."""
    per = largest_alive(dead, tolerance)
    largest = {a: max(k[1] for k in dead if k[0] == a) for a in per}
    inside = [a for a, n in per.items() if n is not None and n < largest[a]]
    sizes = sorted(per[a] for a in inside)
    # The lower median: a size that was actually trained, and the cautious one of two.
    size = sizes[(len(sizes) - 1) // 2] if sizes else None
    return DeadBoundary(per_l1=per, size=size, inside=inside,
                        all_alive=[a for a, n in per.items() if n is not None and n == largest[a]],
                        none_alive=[a for a, n in per.items() if n is None])


@dataclass
class Pointer:
    """What one diagnostic points to: a cell (or just a size) and a sentence saying why."""

    diagnostic: str
    l1: float | None
    size: int | None
    why: str
    match: dict = field(default_factory=dict)   # against the ground-truth optimum, toy only


def steps_between(a, b, axis: list) -> int | None:
    """How many grid steps apart two values of one axis are (None if either is off the axis)."""
    if a is None or b is None or a not in axis or b not in axis:
        return None
    return abs(axis.index(a) - axis.index(b))


def compare_with_optimum(p: Pointer, optimum: Key, l1s: list[float], sizes: list[int]) -> dict:
    """Does ``p`` hit the ground-truth optimum? Size and L1 separately, in grid steps."""
    size_off = steps_between(p.size, optimum[1], sizes)
    l1_off = None if p.l1 is None else steps_between(p.l1, optimum[0], l1s)
    return {"size_steps_off": size_off, "l1_steps_off": l1_off,
            "size_matches": size_off == 0,
            "matches": size_off == 0 and (l1_off is None or l1_off == 0)}


@dataclass
class Diagnosis:
    pointers: list[Pointer]
    dead: DeadBoundary
    l1s: list[float]
    sizes: list[int]
    optimum: Key | None = None       # toy: best MMCS with the ground truth
    optimum_mmcs: float | None = None

    def sizes_pointed(self) -> list[int]:
        return [p.size for p in self.pointers if p.size is not None]

    def estimate(self) -> dict | None:
        """The number of features the diagnostics point to: their range and median size."""
        s = sorted(self.sizes_pointed())
        if not s:
            return None
        return {"low": s[0], "high": s[-1], "median": s[(len(s) - 1) // 2], "sizes": s}


def diagnose(dead: dict[Key, float], ssll: dict[Key, float], mmcs_larger: dict[Key, float],
             mmcs_truth: dict[Key, float] | None = None, *, tolerance: float = 0.0) -> Diagnosis:
    """Where the three diagnostics point, and with ground truth whether they hit its optimum."""
    keys = set(dead) | set(ssll) | set(mmcs_larger)
    l1s = sorted({k[0] for k in keys})
    sizes = sorted({k[1] for k in keys})
    db = dead_boundary(dead, tolerance)
    if db.size is not None:
        why = (f"median over {len(db.inside)} L1 value(s) of the largest dictionary without dead "
               "latents")
    elif db.all_alive and not db.inside:
        why = "no dictionary has dead latents at any L1: the boundary lies beyond the largest size"
    else:
        why = "no L1 value has a boundary inside the grid (dead latents even in the smallest)"
    pointers = [Pointer("dead neurons", None, db.size, why)]
    for name, values, what in (("loss stickiness (SSLL)", ssll, "summed standardised log losses"),
                               ("MMCS with larger dictionaries", mmcs_larger, "MMCS with larger dictionaries")):
        k = peak(values)
        pointers.append(Pointer(name, k[0] if k else None, k[1] if k else None,
                                f"the peak of the {what}" if k else f"no finite {what}"))
    diag = Diagnosis(pointers=pointers, dead=db, l1s=l1s, sizes=sizes)
    if mmcs_truth:
        opt = peak(mmcs_truth)
        if opt is not None:
            diag.optimum, diag.optimum_mmcs = opt, float(mmcs_truth[opt])
            for p in pointers:
                p.match = compare_with_optimum(p, opt, l1s, sizes)
    return diag
