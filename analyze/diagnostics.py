"""Where each of the report's three diagnostics points in an (L1 x dictionary size) grid.

Pure functions of {(l1, size): value} dicts, so they can be tested on constructed grids. Each
definition is read from the report (``shared/SCIENCE.md``) and serves toy data and the LM alike:

- dead neurons: "the largest dictionary, with the largest L1 coefficient, that still has no dead
  neurons". Per L1, the boundary is the largest size with no dead latents (every smaller size
  alive too); the pointer is the largest boundary over the L1 values, at the largest L1 that
  reaches it. Past the number of features extra latents have nothing to learn and die, so where
  even the largest dictionary keeps every latent alive (at any L1) the evidence is open-ended:
  the pointer is then a lower bound, "more than N features", and the grid must grow.
- loss stickiness: per dictionary size, the SSLL profile over L1. Where both losses sit in their
  basins the summed standardised log losses are lowest; an equal-SSLL curve peaks where that
  size's optimal L1 lies, and a dictionary too small for the data has no such basin (all
  sparsity hurts it). So a size "has a basin" when its SSLL minimum over L1 is interior (strictly
  below the values at both ends of the L1 range); the pointer is the smallest size with a basin,
  at its minimising L1.
- MMCS with larger dictionaries: the cell whose features keep reappearing in every larger
  dictionary at the same L1, i.e. where that MMCS peaks (undefined for the largest size).

With ground truth (toy data) each pointer is scored against the truth (grid steps from the true
number of features) and against the optimum (the cell with the best MMCS with the true features).
Without it (an LM), the sizes the diagnostics point to are the estimate of the number of
features, a range whose upper end is open when any pointer is a lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Key = tuple[float, int]

DEAD, SSLL, LARGER = "dead neurons", "loss stickiness (SSLL)", "MMCS with larger dictionaries"


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
    size: int | None           # the largest boundary over L1 (a lower bound if ``open``)
    l1: float | None           # the largest L1 whose boundary is ``size``
    open: bool                 # some L1 keeps even the largest dictionary alive
    inside: list[float]        # L1 values whose boundary is inside the grid
    all_alive: list[float]     # L1 values where even the largest dictionary has no dead latent
    none_alive: list[float]    # L1 values where even the smallest has dead latents
    largest: int | None = None  # the largest dictionary trained (the bound when open)


def dead_boundary(dead: dict[Key, float], tolerance: float = 0.0) -> DeadBoundary:
    """``largest_alive`` per L1, and the grid's pointer: the largest boundary, at the largest L1."""
    per = largest_alive(dead, tolerance)
    largest = {a: max(k[1] for k in dead if k[0] == a) for a in per}
    inside = [a for a, n in per.items() if n is not None and n < largest[a]]
    all_alive = [a for a, n in per.items() if n is not None and n == largest[a]]
    found = [(n, a) for a, n in per.items() if n is not None]
    size, l1 = max(found) if found else (None, None)
    return DeadBoundary(per_l1=per, size=size, l1=l1, open=bool(all_alive), inside=inside,
                        all_alive=all_alive, none_alive=[a for a, n in per.items() if n is None],
                        largest=max(largest.values()) if largest else None)


def ssll_basins(ssll: dict[Key, float]) -> dict[int, float | None]:
    """Per size: the L1 of its SSLL minimum when that minimum is interior (below both ends of
    its L1 profile), else None. Needs at least three finite L1 values for a size."""
    vals = _finite(ssll)
    out: dict[int, float | None] = {}
    for n in sorted({k[1] for k in vals}):
        prof = sorted((a, v) for (a, m), v in vals.items() if m == n)
        if len(prof) < 3:
            out[n] = None
            continue
        i = min(range(len(prof)), key=lambda j: (prof[j][1], j))
        out[n] = prof[i][0] if 0 < i < len(prof) - 1 and prof[i][1] < min(prof[0][1], prof[-1][1]) else None
    return out


@dataclass
class Pointer:
    """What one diagnostic points to: a cell (or just a size) and a sentence saying why.

    ``lower_bound``: the evidence is open-ended; ``size`` is then the largest size trained and
    the number of features is MORE than it.
    """

    diagnostic: str
    l1: float | None
    size: int | None
    why: str
    lower_bound: bool = False
    match: dict = field(default_factory=dict)   # against the truth and the optimum, toy only


def steps_between(a, b, axis: list) -> int | None:
    """How many grid steps apart two values of one axis are (None if either is off the axis)."""
    if a is None or b is None or a not in axis or b not in axis:
        return None
    return abs(axis.index(a) - axis.index(b))


def compare(p: Pointer, optimum: Key | None, truth_size: int | None, l1s: list[float],
            sizes: list[int]) -> dict:
    """Grid steps from the true number of features (size) and from the MMCS optimum (cell).

    A lower bound at N matches only if the truth is beyond N (it never is inside a grid).
    """
    out: dict = {}
    if truth_size is not None:
        off = None if p.lower_bound else steps_between(p.size, truth_size, sizes)
        out.update(size_steps_off=off, size_matches_truth=off == 0)
    if optimum is not None:
        size_off = None if p.lower_bound else steps_between(p.size, optimum[1], sizes)
        l1_off = None if p.l1 is None else steps_between(p.l1, optimum[0], l1s)
        out.update(optimum_size_steps_off=size_off, optimum_l1_steps_off=l1_off,
                   matches_optimum=size_off == 0 and (l1_off is None or l1_off == 0))
    return out


@dataclass
class Diagnosis:
    pointers: list[Pointer]
    dead: DeadBoundary
    l1s: list[float]
    sizes: list[int]
    basins: dict[int, float | None] = field(default_factory=dict)
    optimum: Key | None = None       # toy: best MMCS with the ground truth
    optimum_mmcs: float | None = None
    truth_size: int | None = None    # toy: the number of true features

    def estimate(self) -> dict | None:
        """The number of features the diagnostics point to, as a range. ``high`` is None when
        a pointer is a lower bound (nothing bounds the number from above); ``median`` only when
        the range is closed."""
        points = sorted(p.size for p in self.pointers if p.size is not None and not p.lower_bound)
        bounds = [p.size for p in self.pointers if p.lower_bound]
        if not points and not bounds:
            return None
        lower = max(bounds) if bounds else None
        return {"low": min(points + bounds), "high": None if bounds else points[-1],
                "median": None if bounds else points[(len(points) - 1) // 2],
                "sizes": points, "more_than": lower}


def _dead_pointer(db: DeadBoundary) -> Pointer:
    if db.open:
        at = ", ".join(f"{a:g}" for a in db.all_alive)
        return Pointer(DEAD, None, db.largest, lower_bound=True,
                       why=f"at L1 {at} even the largest dictionary ({db.largest:,} latents) has no "
                           f"dead latent: more than {db.largest:,} features; grow the grid until "
                           "dead latents appear")
    if db.size is None:
        return Pointer(DEAD, None, None, "dead latents even in the smallest dictionary at every L1")
    return Pointer(DEAD, db.l1, db.size,
                   f"the largest dictionary without dead latents ({db.size:,} latents, at L1 "
                   f"{db.l1:g}, the largest L1 that keeps it alive)")


def _ssll_pointer(basins: dict[int, float | None], ssll: dict[Key, float]) -> Pointer:
    with_basin = [n for n, a in basins.items() if a is not None]
    if not with_basin:
        return Pointer(SSLL, None, None, "no dictionary size has an SSLL basin inside the L1 range")
    n = min(with_basin)
    return Pointer(SSLL, basins[n], n, f"the smallest dictionary whose SSLL has an interior minimum "
                   f"over L1 (at {basins[n]:g}); smaller ones have none")


def diagnose(dead: dict[Key, float], ssll: dict[Key, float], mmcs_larger: dict[Key, float],
             mmcs_truth: dict[Key, float] | None = None, *, truth_size: int | None = None,
             tolerance: float = 0.0) -> Diagnosis:
    """Where the three diagnostics point, and with ground truth how far from it they are."""
    keys = set(dead) | set(ssll) | set(mmcs_larger)
    l1s = sorted({k[0] for k in keys})
    sizes = sorted({k[1] for k in keys})
    db = dead_boundary(dead, tolerance)
    basins = ssll_basins(ssll)
    k = peak(mmcs_larger)
    pointers = [_dead_pointer(db), _ssll_pointer(basins, ssll),
                Pointer(LARGER, k[0] if k else None, k[1] if k else None,
                        "the peak of the MMCS with larger dictionaries" if k else
                        "no finite MMCS with larger dictionaries (a grid needs two sizes)")]
    diag = Diagnosis(pointers=pointers, dead=db, l1s=l1s, sizes=sizes, basins=basins,
                     truth_size=truth_size)
    if mmcs_truth:
        diag.optimum = peak(mmcs_truth)
        if diag.optimum is not None:
            diag.optimum_mmcs = float(mmcs_truth[diag.optimum])
    if diag.optimum is not None or truth_size is not None:
        for p in pointers:
            p.match = compare(p, diag.optimum, truth_size, l1s, sizes)
    return diag


def diagnosis_record(d: Diagnosis, base: int, base_name: str) -> dict:
    """What a grid's diagnostics say, as JSON (``diagnosis.json``, the W&B summary)."""
    rec = {"base": base, "base_name": base_name,
           "pointers": [{"diagnostic": p.diagnostic, "l1": p.l1, "size": p.size,
                         "ratio": (p.size / base) if p.size else None,
                         "lower_bound": p.lower_bound, "why": p.why, **p.match}
                        for p in d.pointers],
           "largest_alive_per_l1": {f"{a:g}": n for a, n in d.dead.per_l1.items()},
           "ssll_basin_per_size": {str(n): a for n, a in d.basins.items()}}
    if d.truth_size is not None:
        rec["truth"] = {"size": d.truth_size, "ratio": d.truth_size / base}
    if d.optimum is not None:
        rec["optimum"] = {"l1": d.optimum[0], "size": d.optimum[1], "mmcs": d.optimum_mmcs,
                          "ratio": d.optimum[1] / base}
    est = d.estimate()
    if est is not None:
        rec["estimate"] = {**est, "ratio_low": est["low"] / base,
                           "ratio_high": est["high"] / base if est["high"] is not None else None}
    return rec
