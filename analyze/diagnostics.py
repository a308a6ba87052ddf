"""Where each of the report's three diagnostics points in a (knob x dictionary size) grid.

Pure functions of {(knob, size): value} dicts, so they can be tested on constructed grids. Each
reading is taken from the report (Sharkey, Braun & Millidge 2022), serves toy data and the LM
alike, and is built so that widening the grid moves it only when the new cells carry new evidence:

- dead neurons: "the largest dictionary, with the largest L1 coefficient, that still has no dead
  neurons". Per L1, the boundary is the largest size with at most ``tolerance`` x size dead
  latents, every smaller size passing too. The pointer is the largest boundary over the L1
  values, at the largest L1 that reaches it. A cell of another L1 cannot move an L1's boundary,
  and a new L1 moves the pointer only if its own boundary is larger. Past the number of features
  extra latents have nothing to learn and die, so an L1 whose largest dictionary keeps its
  latents is open-ended there: when such an L1 reaches the pointer, the pointer is a lower bound,
  "more than N features", where N is the largest size alive at that L1 (not the largest size
  anywhere in a ragged grid). The default tolerance is the report's literal rule, 0: on toy
  data, where the truth checks it, no tolerance up to 1% read better at the data's own window,
  and at windows longer than the data needs 0 read best (README: "The count, whichever grid you
  draw"). The pointer is also read at 0.5% and 1% and at every window the run recorded, so an
  LM count that rests on a few latents says so.
- loss stickiness: per dictionary size, its profile over L1 of log reconstruction loss plus log
  L1 loss. Where both losses sit in their basins the sum is lowest; a dictionary too small for
  the data has no such basin (all sparsity hurts it). A size "has a basin" when its minimum over
  L1 is interior (strictly below both ends); the pointer is the smallest size with a basin, at its
  minimising L1. The report z-scores each log loss over the grid before summing; a z-score's
  mean shifts every cell of a profile alike, so only its standard deviation matters to where a
  profile's minimum lies, as the two losses' relative weight, and that weight depends on which
  sizes and L1 values the grid holds: adding a size could make or unmake another size's basin.
  We fix the weight at 1:1 in natural-log units (the log of the product of the two losses, a
  quantity of each cell alone), so a size's pointer moves only when that size's own cells say so.
  The heatmap keeps the report's grid-wide SSLL. Cells whose codes collapsed (held-out L0 below
  ``COLLAPSED_L0``, or an L1 loss of 0) lie past the end of the useful L1 range and are left
  out, whether their L1 loss is 0 or 1e-9.
- MMCS with larger dictionaries: the cell whose features keep reappearing in every larger
  dictionary at the same L1, i.e. where that MMCS peaks (undefined for the largest size).

Other architectures (``train.families``): the grid's own sparsity knob takes L1's place (the
``knob`` of a key is the knob's value: k for TopK, BatchTopK and Matryoshka, the L0 coefficient
for JumpReLU), and every reading is defined as above, unchanged:
- dead neurons, per knob value. A TopK latent dies when the k winners of every row are others,
  which happens to surplus latents as to an L1 SAE's, so dying latents remain the signal without
  AuxK. AuxK exists to revive latents dead for its window (the run's dead window by default) by
  training them on the residual; with it on, the count is of latents AuxK could not revive.
- loss stickiness: log reconstruction loss plus log L1 loss of the codes. For a k knob the codes'
  L1 norm is measured, not penalised, so the report's argument (both losses in their basins as the
  penalty moves) carries over only as a measurement: the same definition, read the same way.
- MMCS with larger dictionaries, at the same knob value: as for L1.
README ("Dictionary architectures") has where each pointed on toy data.

Beyond the report's three, ``analyze.signals`` defines the signals for the dictionaries
researchers train now (live latents, measured latents, novel latents, Matryoshka's prefix
knee); they go through
the same pointers, record and pages. No signal is read without its minimum evidence
(``analyze.evidence``: the dead window a run's own observables call for, and training at least
twice that long); below it a pointer is "no reading", with the reason, never a bound. Each
architecture has a default reading (``DEFAULT_READING``) and the signals its estimate rests on
(``estimate_signals``: the default reading alone, or the report's three for ReLU); the other
signals are printed beside it.

With ground truth (toy data) each pointer is scored against the truth (grid steps from the true
number of features) and against the optimum (the cell with the best MMCS with the true features).
Without it (an LM), the sizes the diagnostics point to are the estimate of the number of
features: a range, or "more than N" when a pointer is a lower bound.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from unsuperpose.analyze.evidence import WindowRule
from unsuperpose.analyze.signals import (
    KNEE,
    LIVE,
    MEASURED,
    NOVEL,
    knee_per_knob,
    live_per_knob,
    novel_per_knob,
    per_knob,
    pool,
    prefix_columns,
)
from unsuperpose.train.registry import DEFAULT_ARCH

Key = tuple[float, int]  # (the knob's value, the dictionary size)

DEAD, SSLL, LARGER = "dead neurons", "loss stickiness (SSLL)", "MMCS with larger dictionaries"

# The reading each architecture's count rests on, as declared before the calibration of
# ``benchmarks/bench_calibration.py`` was read (the docs' "Counting features" page has its
# table). The report's three were argued for an L1 penalty that is varied; the k-architectures
# and JumpReLU fix or penalise L0 instead, so their extra latents are not priced out by the knob,
# but with AuxK on, a latent with something to learn is revived and one with nothing stays dead:
# the live count of a dictionary larger than the count is the signal their training makes.
DECLARED_READING = {
    "relu": DEAD,
    "topk": LIVE,
    "batchtopk": LIVE,
    "matryoshka": LIVE,
    "jumprelu": LIVE,
}
# The defaults after the calibration, by the rule written before its full table was read
# (``bench_calibration.decide_defaults``: keep the declared reading where it landed within one
# grid step of G in every grid, else take a signal that did): JumpReLU's live latents said "more
# than 2x" in 4 of its 6 grids, its measured latents landed within one step in all 6, so they
# are its default. The others keep theirs; topk and batchtopk have no signal that landed within
# one step everywhere (both read 1/4x at G 2,048, topk also at G 1,024), so theirs stays as
# declared and CALIBRATION says where it missed.
DEFAULT_READING = {**DECLARED_READING, "jumprelu": MEASURED}
# The architectures whose estimate rests on more signals than their default reading.
ESTIMATE_SIGNALS = {"relu": (DEAD, SSLL, LARGER)}


def default_reading(arch: str) -> str:
    """``DEFAULT_READING`` of an architecture; dead neurons for one the calibration has not seen."""
    return DEFAULT_READING.get(arch, DEAD)


def estimate_signals(arch: str) -> tuple[str, ...]:
    """The signals an architecture's estimate rests on: ``ESTIMATE_SIGNALS``, else its default
    reading alone."""
    return ESTIMATE_SIGNALS.get(arch, (default_reading(arch),))


# Why each default reading is the default (keyed by the reading).
WHY_DEFAULT = {
    DEAD: "the report's own reading for an L1 SAE; its three diagnostics were argued and "
    "calibrated for a varied L1 penalty",
    LIVE: "k fixes L0, so surplus latents are not priced out by the knob; with AuxK reviving what "
    "has something to learn, the live count of a dictionary larger than the count is the signal",
    MEASURED: "the live count, with a latent counted when it fired often enough on the held-out "
    "rows for its rate to be measured: JumpReLU's larger dictionaries keep hundreds of sporadic "
    "latents alive within the training window, which the live count reads as more features; "
    "chosen by the calibration (within one grid step of G in every toy grid)",
}

# How each architecture's default reading fared on the toy calibration (``make bench
# ARGS=bench_calibration``; the docs' "Counting features" page has every cell): its grids, how
# many it read within one grid step of the true G and at G, and each miss. Kept equal to the
# committed bench records by tests/test_bench_calibration.py. An architecture absent here has
# not been calibrated.
CALIBRATION: dict[str, dict] = {
    "batchtopk": {
        "reading": "live latents",
        "grids": 7,
        "within_one_step": 6,
        "at_truth": 5,
        "misses": ["G 2,048, copula, seed 303: 1/4x"],
    },
    "jumprelu": {
        "reading": "measured latents",
        "grids": 6,
        "within_one_step": 6,
        "at_truth": 5,
        "misses": [],
    },
    "matryoshka": {
        "reading": "live latents",
        "grids": 6,
        "within_one_step": 6,
        "at_truth": 5,
        "misses": [],
    },
    "relu": {
        "reading": "dead neurons",
        "grids": 9,
        "within_one_step": 9,
        "at_truth": 7,
        "misses": [],
    },
    "topk": {
        "reading": "live latents",
        "grids": 9,
        "within_one_step": 7,
        "at_truth": 7,
        "misses": ["G 1,024, copula, seed 303: 1/4x", "G 2,048, copula, seed 303: 1/4x"],
    },
}


def calibration_text(arch: str) -> str:
    """One sentence: how far this architecture's default reading is calibrated."""
    c = CALIBRATION.get(arch)
    if c is None:
        return f"{arch}'s default reading has not been calibrated on toy data."
    text = (
        f"On toy data with a known number of features G, {arch}'s default reading "
        f"({c['reading']}) landed within one grid step of G in {c['within_one_step']} of "
        f"{c['grids']} calibration grids (at G in {c['at_truth']})"
    )
    if c["misses"]:
        return text + "; it missed at " + "; ".join(c["misses"]) + "."
    return text + "."


DEFAULT_TOLERANCE = 0.0
SENSITIVITY_TOLERANCES = (0.0, 0.005, 0.01)
COLLAPSED_L0 = 0.01  # fewer than one active latent per hundred rows: the codes have collapsed


def _finite(values: dict[Key, float]) -> dict[Key, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v)
    }


def peak(values: dict[Key, float]) -> Key | None:
    """The cell with the largest finite value (ties: the smaller dictionary, then smaller L1)."""
    vals = _finite(values)
    if not vals:
        return None
    return max(vals, key=lambda k: (vals[k], -k[1], -k[0]))


# -- dead neurons ---------------------------------------------------------------------------------


def passes(dead: float, n: int, tolerance: float) -> bool:
    """A dictionary of ``n`` latents counts as alive with at most ``tolerance`` x n dead ones."""
    return dead <= tolerance * n


def largest_alive(dead: dict[Key, float], tolerance: float = 0.0) -> dict[float, int | None]:
    """Per L1: the largest size that passes, among sizes all of whose smaller siblings pass too
    (None: even the smallest fails).

    Requiring every smaller size alive keeps one noisy small dictionary from moving the boundary
    past a size that has already lost latents.
    """
    out: dict[float, int | None] = {}
    for a in sorted({k[0] for k in dead}):
        best = None
        for n in sorted(k[1] for k in dead if k[0] == a):
            if not passes(dead[(a, n)], n, tolerance):
                break
            best = n
        out[a] = best
    return out


@dataclass
class DeadBoundary:
    per_knob: dict[float, int | None]  # the largest dictionary alive, per knob value
    size: int | None  # the largest boundary over the knob (a lower bound if ``open``)
    knob: float | None  # the largest knob value whose boundary is ``size``
    open: bool  # an L1 that keeps its largest dictionary alive reaches ``size``
    inside: list[float]  # L1 values whose boundary is inside their sizes
    all_alive: list[float]  # L1 values whose largest dictionary passes (open-ended there)
    none_alive: list[float]  # L1 values where even the smallest fails
    largest: dict[float, int] = field(default_factory=dict)  # the largest size trained per L1
    tolerance: float = 0.0

    # The names these had when the knob was always L1 (deprecated).
    per_l1 = property(lambda self: self.per_knob)
    l1 = property(lambda self: self.knob)


def dead_boundary(dead: dict[Key, float], tolerance: float = 0.0) -> DeadBoundary:
    """``largest_alive`` per L1, and the grid's pointer: the largest boundary, at the largest L1.

    The pointer is a lower bound only when an L1 that keeps even its largest dictionary alive
    reaches it: an open L1 trained to smaller sizes only says "more than" a number the pointer
    already passes, so it does not make the pointer open (it is listed in ``all_alive``).
    """
    per = largest_alive(dead, tolerance)
    largest = {a: max(k[1] for k in dead if k[0] == a) for a in per}
    all_alive = [a for a, n in per.items() if n is not None and n == largest[a]]
    inside = [a for a, n in per.items() if n is not None and n < largest[a]]
    found = [(n, a) for a, n in per.items() if n is not None]
    size, knob = max(found) if found else (None, None)
    is_open = size is not None and any(largest[a] >= size for a in all_alive)
    return DeadBoundary(
        per_knob=per,
        size=size,
        knob=knob,
        open=is_open,
        inside=inside,
        all_alive=all_alive,
        none_alive=[a for a, n in per.items() if n is None],
        largest=largest,
        tolerance=tolerance,
    )


def dead_sensitivity(
    dead_by_window: dict[int, dict[Key, float]], tolerances=SENSITIVITY_TOLERANCES
) -> list[dict]:
    """Where the dead-neuron pointer lands for each (window, tolerance): how much the count rests
    on a few latents and on the window."""
    out = []
    for window in sorted(dead_by_window):
        for t in tolerances:
            db = dead_boundary(dead_by_window[window], t)
            out.append(
                {
                    "window": window,
                    "tolerance": t,
                    "size": db.size,
                    "knob": db.knob,
                    "lower_bound": db.open,
                }
            )
    return out


# -- loss stickiness ------------------------------------------------------------------------------


def _positive_log(v) -> float:
    return math.log(v) if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else math.nan


def ssll_profiles(
    recon: dict[Key, float], l1_loss: dict[Key, float], l0: dict[Key, float] | None = None
) -> dict[int, list[tuple[float, float]]]:
    """Per size, [(l1, log recon + log l1 loss)] over that size's usable cells, by L1.

    Usable: both logs defined and, when ``l0`` is given, codes not collapsed. Each value is the
    cell's own (no weight fitted to the grid), so no other cell weighs in.
    """
    out: dict[int, list[tuple[float, float]]] = {}
    for n in sorted({k[1] for k in recon}):
        prof = []
        for a, m in sorted(recon):
            if m != n:
                continue
            lr, ll = _positive_log(recon.get((a, n))), _positive_log(l1_loss.get((a, n)))
            collapsed = l0 is not None and (a, n) in l0 and not l0[(a, n)] >= COLLAPSED_L0
            if math.isfinite(lr) and math.isfinite(ll) and not collapsed:
                prof.append((a, lr + ll))
        out[n] = prof
    return out


def _interior_minimum(prof: list[tuple[float, float]]) -> float | None:
    """The L1 of a profile's [(l1, value)] minimum when it is interior (strictly below both
    ends), else None; needs at least three values."""
    if len(prof) < 3:
        return None
    i = min(range(len(prof)), key=lambda j: (prof[j][1], j))
    interior = 0 < i < len(prof) - 1 and prof[i][1] < min(prof[0][1], prof[-1][1])
    return prof[i][0] if interior else None


def interior_minima(values: dict[Key, float]) -> dict[int, float | None]:
    """Per size: the L1 of the minimum of ``values`` over L1 when it is interior, else None (the
    report's own grid-wide SSLL read the same way; printed beside our reading)."""
    vals = _finite(values)
    return {
        n: _interior_minimum(sorted((a, v) for (a, m), v in vals.items() if m == n))
        for n in sorted({k[1] for k in vals})
    }


def ssll_basins(
    recon: dict[Key, float], l1_loss: dict[Key, float], l0: dict[Key, float] | None = None
) -> dict[int, float | None]:
    """Per size: the L1 of its summed-log-loss profile's interior minimum, else None."""
    return {n: _interior_minimum(prof) for n, prof in ssll_profiles(recon, l1_loss, l0).items()}


# -- pointers and the estimate --------------------------------------------------------------------


@dataclass
class Pointer:
    """What one diagnostic points to: a cell (or just a size) and a sentence saying why.

    ``lower_bound``: the evidence is open-ended; the number of features is MORE than ``size``.
    """

    diagnostic: str
    knob: float | None  # the knob value of the cell pointed to (None: only a size)
    size: int | None
    why: str
    lower_bound: bool = False
    match: dict = field(default_factory=dict)  # against the truth and the optimum, toy only
    reading: bool = True  # False: below the signal's minimum evidence; ``why`` says what is missing
    default: bool = False  # the architecture's default reading

    l1 = property(lambda self: self.knob)  # its name when the knob was always L1 (deprecated)


def no_reading(diagnostic: str, reason: str) -> Pointer:
    return Pointer(diagnostic, None, None, f"no reading: {reason}", reading=False)


def steps_between(a, b, axis: list) -> int | None:
    """How many grid steps apart two values of one axis are (None if either is off the axis)."""
    if a is None or b is None or a not in axis or b not in axis:
        return None
    return abs(axis.index(a) - axis.index(b))


def size_steps_between(a, b, sizes: list[int]) -> int | None:
    """Grid steps between two sizes; a size off the axis (a Matryoshka prefix) counts in the
    axis's own step ratio, rounded (sizes a constant ratio apart, as the grids' are)."""
    if a is None or b is None:
        return None
    on_axis = steps_between(a, b, sizes)
    if on_axis is not None or len(sizes) < 2 or a <= 0 or b <= 0:
        return on_axis
    ratio = (sizes[-1] / sizes[0]) ** (1 / (len(sizes) - 1))
    return round(abs(math.log(a / b)) / math.log(ratio)) if ratio > 1 else None


def compare(
    p: Pointer, optimum: Key | None, truth_size: int | None, knobs: list[float], sizes: list[int]
) -> dict:
    """Grid steps from the true number of features (size) and from the MMCS optimum (cell).

    A lower bound at N matches only if the truth is beyond N (it never is inside a grid).
    """
    out: dict = {}
    if truth_size is not None:
        off = None if p.lower_bound else size_steps_between(p.size, truth_size, sizes)
        out.update(size_steps_off=off, size_matches_truth=off == 0)
    if optimum is not None:
        size_off = None if p.lower_bound else size_steps_between(p.size, optimum[1], sizes)
        knob_off = None if p.knob is None else steps_between(p.knob, optimum[0], knobs)
        out.update(
            optimum_size_steps_off=size_off,
            optimum_knob_steps_off=knob_off,
            matches_optimum=size_off == 0 and (knob_off is None or knob_off == 0),
        )
    return out


def _whole(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


@dataclass
class Diagnosis:
    pointers: list[Pointer]
    dead: DeadBoundary
    knobs: list[float]
    sizes: list[int]
    basins: dict[int, float | None] = field(default_factory=dict)
    report_basins: dict[int, float | None] = field(default_factory=dict)  # grid-wide SSLL
    optimum: Key | None = None  # toy: best MMCS with the ground truth
    optimum_mmcs: float | None = None
    truth_size: int | None = None  # toy: the number of true features
    window: int | None = None  # the dead window of the default reading (batches)
    sensitivity: list[dict] = field(default_factory=list)  # dead_sensitivity rows
    arch: str = DEFAULT_ARCH
    rule: WindowRule | None = None  # the window rule and the minimum evidence (None: not checked)

    @property
    def basis(self) -> tuple[str, ...]:
        """The signals the estimate rests on for this architecture."""
        return estimate_signals(self.arch)

    def estimate(self) -> dict | None:
        """The number of features the architecture's estimate signals (``basis``) point to.

        No reading from any of them: ``{"no_estimate": [reasons], ...}`` with every number None.
        Open (some pointer is a lower bound): ``{"more_than": N, "low": None, "high": None,
        "median": None}``, N the largest bound; nothing bounds the number from above, and no
        figure below N is offered as its low end. Closed: ``low <= median <= high`` over the
        pointed sizes, with the true median (the mean of the middle two for an even count).
        ``sizes`` lists the sizes the non-bound pointers gave either way; ``basis`` the signals
        used. None: no signal pointed inside the grid.
        """
        used = [p for p in self.pointers if p.diagnostic in self.basis]
        read = [p for p in used if p.reading]
        empty = {"more_than": None, "low": None, "high": None, "median": None, "sizes": []}
        if not read:
            reasons = sorted({p.why.removeprefix("no reading: ") for p in used}) or [
                "no signal applies to this grid"
            ]
            return {**empty, "no_estimate": reasons, "basis": list(self.basis)}
        points = sorted(p.size for p in read if p.size is not None and not p.lower_bound)
        bounds = [p.size for p in read if p.lower_bound and p.size is not None]
        basis = [p.diagnostic for p in read]
        if bounds:
            return {**empty, "more_than": max(bounds), "sizes": points, "basis": basis}
        if not points:
            return None
        return {
            "more_than": None,
            "low": points[0],
            "high": points[-1],
            "median": _whole(statistics.median(points)),
            "sizes": points,
            "basis": basis,
        }

    def literal(self) -> dict | None:
        """The report's literal dead-neuron rule (tolerance 0) at the default window."""
        return next(
            (r for r in self.sensitivity if r["tolerance"] == 0 and r["window"] == self.window),
            None,
        )


def _dead_pointer(db: DeadBoundary) -> Pointer:
    tol = f"at most {db.tolerance:.1%} of latents dead" if db.tolerance else "no dead latent"
    if db.size is None:
        return Pointer(DEAD, None, None, f"even the smallest dictionary fails ({tol}) at every L1")
    if db.open:
        at = ", ".join(f"{a:g}" for a in db.all_alive if db.largest[a] >= db.size)
        return Pointer(
            DEAD,
            db.knob,
            db.size,
            lower_bound=True,
            why=f"at L1 {at} the largest dictionary trained ({db.size:,} latents) "
            f"still passes ({tol}): more than {db.size:,} features; train larger "
            "dictionaries at that L1 until latents die",
        )
    why = (
        f"the largest dictionary that passes ({tol}): {db.size:,} latents, at L1 {db.knob:g}, "
        "the largest L1 that keeps it"
    )
    short = [a for a in db.all_alive if db.largest[a] < db.size]
    if short:
        why += (
            f"; L1 {', '.join(f'{a:g}' for a in short)} kept every size it was trained at, "
            "all below this one"
        )
    return Pointer(DEAD, db.knob, db.size, why)


def _ssll_pointer(basins: dict[int, float | None]) -> Pointer:
    with_basin = [n for n, a in basins.items() if a is not None]
    if not with_basin:
        return Pointer(SSLL, None, None, "no dictionary size has an SSLL basin inside the L1 range")
    n = min(with_basin)
    return Pointer(
        SSLL,
        basins[n],
        n,
        f"the smallest dictionary whose summed log losses (log "
        f"reconstruction + log L1 loss) have an interior minimum over L1 (at "
        f"{basins[n]:g}); smaller ones have none",
    )


def dead_columns(columns: dict[str, dict[Key, float]], window: int | None) -> dict[int, dict]:
    """{window: dead counts} from a grid's columns: ``dead`` at the run's window, and each
    ``dead_w<W>`` the trainer recorded in every cell (a window some cells lack is skipped)."""
    keys = set(columns.get("dead", {}))
    out = {}
    for name, values in columns.items():
        if name.startswith("dead_w") and name[6:].isdigit() and keys and keys <= set(values):
            out[int(name[6:])] = values
    if window is not None and columns.get("dead"):
        out[window] = columns["dead"]
    return out


def _pooled_pointer(name: str, per: dict, what: str) -> Pointer:
    a, n, is_open = pool(per)
    if n is None:
        return no_reading(name, f"no knob value has two sizes to compare ({what})")
    values = ", ".join(
        f"{v:g}: {'more than ' if o else ''}{m:,}" for v, (m, o) in sorted(per.items())
    )
    if is_open:
        why = f"{what} still grows at the largest sizes (per knob value {values}): more than {n:,}"
    else:
        why = f"{what} (per knob value {values}; the median)"
    return Pointer(name, a, n, why, lower_bound=is_open)


def _signal_pointers(columns: dict[str, dict[Key, float]]) -> list[Pointer]:
    """The signals of ``analyze.signals`` that the columns can feed."""
    out = []
    dead = columns.get("dead") or {}
    if dead:
        live = {k: k[1] - v for k, v in dead.items()}
        out.append(
            _pooled_pointer(
                LIVE,
                live_per_knob(live),
                "the smallest size whose next size keeps fewer than half its added latents alive",
            )
        )
    measured = columns.get("measured") or {}
    if measured:
        out.append(
            _pooled_pointer(
                MEASURED,
                live_per_knob(measured),
                "the smallest size whose next size keeps fewer than half its added latents "
                "measured (10+ fires on the held-out rows)",
            )
        )
    novel = columns.get("novel_next") or {}
    if novel:
        sizes = per_knob(set(dead) | set(novel) | set(columns.get("heldout_mse") or {}))
        out.append(
            _pooled_pointer(
                NOVEL,
                novel_per_knob(novel, sizes),
                "the smallest size whose next size adds fewer novel live latents (best decoder "
                "|cosine| with the smaller one's below 0.7) than half its added latents",
            )
        )
    prefixes = prefix_columns(columns)
    if prefixes:
        out.append(
            _pooled_pointer(
                KNEE,
                knee_per_knob(prefixes),
                "the smallest prefix of the largest dictionary whose next prefix cuts its "
                "held-out FVU by less than 10%",
            )
        )
    return out


def diagnose(
    columns: dict[str, dict[Key, float]],
    *,
    truth_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    window: int | None = None,
    rule: WindowRule | None = None,
    arch: str = DEFAULT_ARCH,
) -> Diagnosis:
    """Where every count signal points, and with ground truth how far from it each is.

    ``columns``: {name: {(l1, size): value}} with ``dead``, ``heldout_mse``,
    ``heldout_l1_loss``, ``mmcs_larger``, optionally ``heldout_l0``, ``dead_w<W>`` (dead at
    other windows, for the sensitivity table), ``novel_next`` and ``heldout_fvu_m<m>``
    (``analyze.signals``) and with ground truth ``mmcs``. ``window``: the window behind ``dead``.
    ``rule``: the run's window rule (``analyze.evidence.window_rule``); when it has no window
    or the grid is below its minimum evidence every signal is "no reading". A caller that
    builds columns itself (a constructed grid) may leave it None.
    """

    def col(name):
        return columns.get(name) or {}

    dead, recon, l1_loss = col("dead"), col("heldout_mse"), col("heldout_l1_loss")
    keys = set(dead) | set(recon) | set(col("mmcs_larger"))
    knobs = sorted({k[0] for k in keys})
    sizes = sorted({k[1] for k in keys})
    db = dead_boundary(dead, tolerance)
    basins = ssll_basins(recon, l1_loss, columns.get("heldout_l0"))
    report_basins = interior_minima(col("ssll"))
    k = peak(col("mmcs_larger"))
    default = default_reading(arch)
    pointers = [
        _dead_pointer(db),
        _ssll_pointer(basins),
        Pointer(
            LARGER,
            k[0] if k else None,
            k[1] if k else None,
            "the peak of the MMCS with larger dictionaries"
            if k
            else "no finite MMCS with larger dictionaries (a grid needs two sizes)",
        ),
        *_signal_pointers(columns),
    ]
    if rule is not None and not rule.readable:
        # novel latents need the window to tell live latents; the pointer is there all the same
        for name in (MEASURED, NOVEL):
            if dead and not any(p.diagnostic == name for p in pointers):
                pointers.append(no_reading(name, ""))
        pointers = [no_reading(p.diagnostic, rule.reason or "no dead window") for p in pointers]
    for p in pointers:
        p.default = p.diagnostic == default
    tolerances = sorted({*SENSITIVITY_TOLERANCES, tolerance})
    diag = Diagnosis(
        pointers=pointers,
        dead=db,
        knobs=knobs,
        sizes=sizes,
        basins=basins,
        report_basins=report_basins,
        truth_size=truth_size,
        window=window,
        sensitivity=dead_sensitivity(dead_columns(columns, window), tolerances),
        arch=arch,
        rule=rule,
    )
    mmcs_truth = columns.get("mmcs")
    if mmcs_truth:
        diag.optimum = peak(mmcs_truth)
        if diag.optimum is not None:
            diag.optimum_mmcs = float(mmcs_truth[diag.optimum])
    if diag.optimum is not None or truth_size is not None:
        for p in pointers:
            p.match = compare(p, diag.optimum, truth_size, knobs, sizes)
    return diag


def read_record(rec: dict) -> dict:
    """A diagnosis record (a grid's, or a report's ``{"lm": ..., "toy": ...}``) in today's names,
    whichever version wrote it: records written when the knob was always L1 name its value
    ``l1`` (pointers, optimum, dead_sensitivity, the literal dead rule), and say
    ``optimum_l1_steps_off`` and ``largest_alive_per_l1``."""
    rec = dict(rec)
    for side in ("lm", "toy"):
        if isinstance(rec.get(side), dict):
            rec[side] = read_record(rec[side])

    def knob(entry: dict) -> dict:
        entry = dict(entry)
        if "l1" in entry and "knob" not in entry:
            entry["knob"] = entry.pop("l1")
        if "optimum_l1_steps_off" in entry:
            entry["optimum_knob_steps_off"] = entry.pop("optimum_l1_steps_off")
        return entry

    if "pointers" in rec:
        rec["pointers"] = [knob(p) for p in rec["pointers"]]
    if isinstance(rec.get("optimum"), dict):
        rec["optimum"] = knob(rec["optimum"])
    if isinstance(rec.get("dead_sensitivity"), list):
        rec["dead_sensitivity"] = [knob(s) for s in rec["dead_sensitivity"]]
    literal = (rec.get("dead_reading") or {}).get("literal_rule")
    if isinstance(literal, dict):
        rec["dead_reading"] = {**rec["dead_reading"], "literal_rule": knob(literal)}
    if "largest_alive_per_l1" in rec:
        rec["largest_alive_per_knob"] = rec.pop("largest_alive_per_l1")
    return rec


def diagnosis_record(d: Diagnosis, base: int, base_name: str) -> dict:
    """What a grid's diagnostics say, as JSON (``diagnosis.json``, the W&B summary)."""
    rec = {
        "base": base,
        "base_name": base_name,
        "pointers": [
            {
                "diagnostic": p.diagnostic,
                "knob": p.knob,
                "size": p.size,
                "ratio": (p.size / base) if p.size else None,
                "lower_bound": p.lower_bound,
                "reading": p.reading,
                "default": p.default,
                "why": p.why,
                **p.match,
            }
            for p in d.pointers
        ],
        "arch": d.arch,
        "default_reading": {
            "diagnostic": default_reading(d.arch),
            "why": WHY_DEFAULT[default_reading(d.arch)],
            "estimate_signals": list(d.basis),
            "calibration": CALIBRATION.get(d.arch),
            "calibration_text": calibration_text(d.arch),
        },
        "window_rule": d.rule.record() if d.rule is not None else None,
        "dead_reading": {
            "tolerance": d.dead.tolerance,
            "window": d.window,
            "literal_rule": d.literal(),
        },
        "dead_sensitivity": d.sensitivity,
        "largest_alive_per_knob": {f"{a:g}": n for a, n in d.dead.per_knob.items()},
        "ssll_basin_per_size": {str(n): a for n, a in d.basins.items()},
        # the report's grid-wide z-scores read the same way: grid-dependent, shown beside ours
        "ssll_report_weights": {
            "basin_per_size": {str(n): a for n, a in d.report_basins.items()},
            "size": min((n for n, a in d.report_basins.items() if a is not None), default=None),
        },
    }
    if d.truth_size is not None:
        rec["truth"] = {"size": d.truth_size, "ratio": d.truth_size / base}
    if d.optimum is not None:
        rec["optimum"] = {
            "knob": d.optimum[0],
            "size": d.optimum[1],
            "mmcs": d.optimum_mmcs,
            "ratio": d.optimum[1] / base,
        }
    est = d.estimate()
    if est is not None:

        def ratio(v):
            return v / base if v is not None else None

        rec["estimate"] = {
            **est,
            "ratio_median": ratio(est["median"]),
            "ratio_more_than": ratio(est["more_than"]),
            "ratio_low": ratio(est["low"]),
            "ratio_high": ratio(est["high"]),
        }
    return rec
