"""How long a latent may stay silent before it counts as dead, from what a run shows, and the
minimum evidence below which no count signal is read.

The rule (written down before it was measured; the same for toy data and an LM). A latent is
dead when it has not fired in the last W training batches. W must be long enough that a latent
firing as rarely as the grid's rarest *measured* latents fires at least once in W batches with
probability at least 1 - ``MISS``:

    W* = ceil( ln(1 / MISS) / (-B * ln(1 - r)) )

- B: the run's batch (rows per step, all ranks together);
- r: the rare-latent rate, read from the trained dictionaries on their held-out rows. A latent's
  rate is *measured* when it fired at least ``MIN_FIRES`` times on the held-out rows (a Poisson
  count of 10 is known to about +-30%). Per knob value, take the largest dictionary (it holds the
  rarest latents that knob value trains) and the ``RATE_QUANTILE`` quantile of its measured
  latents' rates (the quantile, so that one or two latents do not set it alone; with at most 100
  measured latents, the rarest). r is the lower median of these over the knob values (each rate
  over the rows that dictionary was evaluated on); the median keeps a knob value whose
  dictionaries keep everything (a penalty too weak to shed anything) or whose codes collapse
  from setting the window alone.
- So r is never below ``MIN_FIRES`` / held-out rows: what a count reads is the latents, and so
  the features, that fire at least about that often. A latent rarer than the held-out rows can
  measure is called dead when it has been silent for W* batches; a larger held-out set lets the
  rule protect rarer latents.

Revisions, all recorded here; the calibration grids keep their run folders and are read again
under each (``CAL_REREAD=1``), and the README shows the readings of the last two rules.
- Twice before any calibration grid was read, on a development grid (h 64, G 128, 1,500 steps,
  L1 too low for the data: L0 20-140 where the truth has 5), where the truth's window is 3
  batches: the smallest quantile over every dictionary let one oversized dictionary's split
  latents (1e-4 of rows) set 253 batches; the median over every dictionary was set by dense
  small dictionaries (a window of 1).
- Third, after the first calibration grid (relu, G 256), for a reason outside it: the tiny LM's
  grids have a dead latent or two in nearly every dictionary, and requiring every latent to fire
  10 times left no dictionary to read; the 1% quantile over *all* latents had to be measured.
- Fourth (this rule), after the G 512 calibration grids showed rule three failing for TopK and
  BatchTopK (a window of 2 batches where the truth's is 183, and live latents at 1/2x): rule
  three took, per knob value, the largest dictionary whose 1%-quantile latent over all its
  latents was measured, so any dictionary with more than 1% silent latents was passed over. Above
  the count (and for TopK already at 1x) a dictionary has many silent latents, the very thing
  its live count reads, so only the 1/4x dictionary, whose every latent merges several features
  and fires often, set r. A latent that fired fewer than ``MIN_FIRES`` times tells nothing about
  how rare a kept latent can be, so it now neither sets r nor disqualifies its dictionary. This
  is the measurement rule applied per latent instead of per dictionary, not a value fitted to
  the failed cells; every grid, the ones rule three read well included, is reported under both.

Minimum evidence (below it a signal returns "no reading", with the reason; never a bound):
- the per-latent statistics a run saves beside each dictionary (runs made before them have none);
- r measured, not guessed: some latent of a knob value's largest dictionary fired at least
  ``MIN_FIRES`` times on the held-out rows; with none, held-out rows are too few to see any
  rate and W* would be a guess;
- steps >= ``BURN_IN`` x W*: the last W* batches, over which deaths are read, come after every
  latent has itself trained for W* batches, so a latent silent since its initialisation is not
  read as one the data let die. This is also the least training any count signal is read on: a
  grid shorter than it has not shown its rarest kept latents their features enough times to
  say which latents carry features.

- converged: every dictionary's training reconstruction loss (``train_mse`` in the run's
  history, logged every ``log_every`` steps), in units of the data's variance (FVU), fell by
  less than ``CONVERGED_FVU`` (0.01) from the fifth of the run before the last to the last fifth
  (means over the log points in each): the last fifth of training explained less than 1% more of
  the variance. Absolute, not relative: a dictionary whose error tends to 0 (a weak penalty)
  keeps halving it forever without learning anything the count could see. The signals compare
  dictionaries with each other; one still learning reads as one that has less to learn. A run
  whose log has no point in either fifth cannot show it, and is not read.

Nothing here uses the truth. On toy data the window the truth would choose (the rarest true
feature's rate, ``toy.sampling.dead_window_for``) is printed beside W* for comparison only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Key = tuple[float, int]

MISS = 1e-3
RATE_QUANTILE = 0.01
MIN_FIRES = 10
BURN_IN = 2
CONVERGED_FVU = 0.01
RULE_VERSION = 4  # the revisions in the module docstring; records say which rule read them


def window_for_rate(rate: float, batch_size: int, miss: float = MISS) -> int:
    """Batches after which a latent firing on a fraction ``rate`` of rows has fired at least once
    with probability 1 - ``miss``."""
    if not rate > 0:
        raise ValueError("a window needs a positive firing rate")
    per_batch = -batch_size * math.log1p(-min(rate, 1 - 1e-12))
    return max(1, math.ceil(math.log(1 / miss) / per_batch))


def _measured_quantile(fires: torch.Tensor) -> int | None:
    """The RATE_QUANTILE quantile (lower) of the fire counts of a dictionary's measured latents
    (those that fired MIN_FIRES times or more); None when it has none."""
    measured = torch.sort(fires[fires >= MIN_FIRES]).values
    if not len(measured):
        return None
    return int(measured[int(RATE_QUANTILE * (len(measured) - 1))])


@dataclass
class WindowRule:
    """The rule's inputs and its window; ``reason`` says why there is none (then ``window`` is
    None and no signal is read)."""

    window: int | None
    rate: float | None = None  # r
    fires: int | None = None  # the held-out fires of the latent that set r
    cell: Key | None = None  # the dictionary that set r
    batch_size: int | None = None
    heldout_rows: int | None = None
    steps: int | None = None
    measured: int = 0  # latents of the dictionary that set r with MIN_FIRES+ held-out fires
    reason: str | None = None
    truth_window: int | None = None  # toy data only: the truth's window, for comparison
    notes: list[str] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        return self.window is not None and self.reason is None

    @property
    def steps_needed(self) -> int | None:
        return None if self.window is None else BURN_IN * self.window

    def record(self) -> dict:
        return {
            "rule": f"W = ceil(ln(1/{MISS:g}) / (-B ln(1 - r))), r the {RATE_QUANTILE:.0%} "
            "quantile of the held-out firing rates of each knob value's largest dictionary's "
            f"latents that fired {MIN_FIRES}+ times, lower median over knob values",
            "rule_version": RULE_VERSION,
            "window": self.window,
            "rate": self.rate,
            "rate_fires": self.fires,
            "rate_cell": list(self.cell) if self.cell else None,
            "rate_measured_latents": self.measured,
            "batch_size": self.batch_size,
            "heldout_rows": self.heldout_rows,
            "steps": self.steps,
            "steps_needed": self.steps_needed,
            "readable": self.readable,
            "reason": self.reason,
            "truth_window": self.truth_window,
        }


def window_rule(
    latents: dict[Key, dict[str, torch.Tensor]],
    *,
    batch_size: int | None,
    heldout_rows: int | dict[Key, int] | None,
    steps: int | None,
    truth_window: int | None = None,
    curves: dict[Key, list[tuple[int, float]]] | None = None,
    variance: float | None = None,
) -> WindowRule:
    """The dead window a grid's own observables call for, and whether the grid is long enough
    to read any count signal (module docstring). ``curves``: each dictionary's training MSE
    over steps, for the convergence check (None: not checked, a constructed grid), in units of
    ``variance`` (the data's, per coordinate)."""
    rows_of = (
        heldout_rows if isinstance(heldout_rows, dict) else dict.fromkeys(latents, heldout_rows)
    )
    base = dict(
        batch_size=batch_size,
        heldout_rows=min(rows_of.values()) if rows_of and all(rows_of.values()) else None,
        steps=steps,
        truth_window=truth_window,
    )
    if not latents:
        return WindowRule(
            None,
            reason="the run saved no per-latent statistics (latents.safetensors beside each "
            "dictionary; runs made before they existed have none): retrain the grid to read it",
            **base,
        )
    if not batch_size or base["heldout_rows"] is None or steps is None:
        return WindowRule(
            None, reason="the run does not record its batch size, steps or held-out rows", **base
        )
    rare = []
    largest = [(a, max(n for v, n in latents if v == a)) for a in sorted({a for a, _ in latents})]
    for cell in largest:
        fires = latents[cell]["heldout_fires"]
        q = _measured_quantile(fires)
        if q is not None:
            rare.append((q / rows_of[cell], q, cell, int((fires >= MIN_FIRES).sum())))
    if not rare:
        best = max(int(latents[c]["heldout_fires"].max()) for c in largest)
        return WindowRule(
            None,
            fires=best,
            reason=f"no latent's rate is measured: in no knob value's largest dictionary did a "
            f"latent fire {MIN_FIRES} times or more on the {base['heldout_rows']:,}+ held-out "
            f"rows (at most {best}); evaluate on more held-out rows (a larger store, or "
            "--eval-rows)",
            **base,
        )
    rare.sort()
    rate, fires, cell, measured = rare[(len(rare) - 1) // 2]  # the lower median over knobs
    window = window_for_rate(rate, batch_size)
    base["heldout_rows"] = rows_of[cell]  # the rows the rate was measured on
    rule = WindowRule(window, rate=rate, fires=fires, cell=cell, measured=measured, **base)
    unconverged = None if curves is None else convergence_reason(curves, steps, variance)
    if steps < BURN_IN * window:
        rule.reason = (
            f"the grid trained {steps:,} steps; the rule's dead window is {window:,} batches "
            f"of {batch_size:,} (rare measured latents fire on {rate:.2g} of rows), and a count "
            f"needs at least {BURN_IN} windows of training: train at least "
            f"{BURN_IN * window:,} steps"
        )
    elif unconverged:
        rule.reason = unconverged
    return rule


def still_learning(
    curves: dict[Key, list[tuple[int, float]]],
    steps: int,
    variance: float,
    fall: float = CONVERGED_FVU,
) -> tuple[list[tuple[Key, float]], list[Key]]:
    """([(cell, its FVU's fall over the last fifth)] for the cells still falling by ``fall`` or
    more, [cells whose log cannot tell]) from {cell: [(step, training MSE per coordinate)]};
    ``variance``: the data's variance per coordinate (MSE / FVU)."""
    falling, unknown = [], []
    for key, curve in sorted(curves.items()):
        last = [v for t, v in curve if 0.8 * steps < t <= steps]
        before = [v for t, v in curve if 0.6 * steps < t <= 0.8 * steps]
        if not last or not before:
            unknown.append(key)
            continue
        drop = (sum(before) / len(before) - sum(last) / len(last)) / variance
        if not math.isfinite(drop):
            unknown.append(key)
        elif drop >= fall:
            falling.append((key, drop))
    return falling, unknown


def convergence_reason(
    curves: dict[Key, list[tuple[int, float]]], steps: int, variance: float | None
) -> str | None:
    """Why the grid is not shown converged (None: every dictionary is)."""
    if not curves or not variance:
        return (
            "the run's history has no training loss per dictionary (runs made before it was "
            "logged): convergence cannot be shown; retrain the grid to read it"
        )
    falling, unknown = still_learning(curves, steps, variance)
    if unknown:
        return (
            f"the training log of {len(unknown)} dictionar{'y' if len(unknown) == 1 else 'ies'} "
            f"has no point in the last two fifths of the {steps:,} steps: convergence cannot be "
            "shown; log more often (--log-every at most a tenth of --steps)"
        )
    if falling:
        worst_key, worst = max(falling, key=lambda kf: kf[1])
        return (
            f"{len(falling)} of {len(curves)} dictionaries were still learning: their training "
            f"FVU fell by {CONVERGED_FVU:g} or more over the last fifth of the {steps:,} steps "
            f"(most: {worst:.3f}, size {worst_key[1]:,} at knob {worst_key[0]:g}); train longer"
        )
    return None


def dead_counts(latents: dict[Key, dict[str, torch.Tensor]], window: int) -> dict[Key, int]:
    """Latents of each dictionary silent for the last ``window`` training batches."""
    return {k: int((s["since_fired"] >= window).sum()) for k, s in latents.items()}


def live_masks(latents: dict[Key, dict[str, torch.Tensor]], window: int) -> dict[Key, torch.Tensor]:
    """(n,) bool per dictionary: latents that fired within the last ``window`` batches."""
    return {k: s["since_fired"] < window for k, s in latents.items()}
