"""How long a latent may stay silent before it counts as dead, from what a run shows, and the
minimum evidence below which no count signal is read.

The rule (written down before it was measured; the same for toy data and an LM). A latent is
dead when it has not fired in the last W training batches. W must be long enough that a latent
firing as rarely as the grid's rare *kept* latents fires at least once in W batches with
probability at least 1 - ``MISS``:

    W* = ceil( ln(1 / MISS) / (-B * ln(1 - r)) )

- B: the run's batch (rows per step, all ranks together);
- r: the rare-kept-latent rate, read from the trained dictionaries on their held-out rows. A
  dictionary *keeps* its latents when every one of them fired on the held-out rows; per such
  dictionary take the ``RATE_QUANTILE`` quantile of its latents' firing rates (fires / rows, the
  quantile so that one or two latents that fired a handful of times do not set it alone); r is
  the (lower) median of these over the grid: the rate at which a typical fully used dictionary
  of this grid keeps its rare latents alive, so a window that would call such a latent dead is
  too short. When no dictionary keeps all its latents, every dictionary counts, over the
  latents that fired.
  Revised once, before any calibration grid was read: the first version took the smallest
  quantile over the grid, and on a development grid (h 64, G 128, 1,500 steps) one oversized
  dictionary at the lowest L1, whose split latents fired on 1e-4 of rows, set a window of 253
  batches where the truth's is 3. The median keeps one such dictionary from setting it alone.

Minimum evidence (below it a signal returns "no reading", with the reason; never a bound):
- the per-latent statistics a run saves beside each dictionary (runs made before them have none);
- r measured, not guessed: the latent that sets r fired at least ``MIN_FIRES`` times on the
  held-out rows (a Poisson count of 10 is known to about +-30%); with fewer, held-out rows are too
  few to see the rare latents and W* would be a guess;
- steps >= ``BURN_IN`` x W*: the last W* batches, over which deaths are read, come after every
  latent has itself trained for W* batches, so a latent silent since its initialisation is not
  read as one the data let die. This is also the least training any count signal is read on: a
  grid shorter than it has not shown its rarest kept latents their features enough times to
  say which latents carry features.

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


def window_for_rate(rate: float, batch_size: int, miss: float = MISS) -> int:
    """Batches after which a latent firing on a fraction ``rate`` of rows has fired at least once
    with probability 1 - ``miss``."""
    if not rate > 0:
        raise ValueError("a window needs a positive firing rate")
    per_batch = -batch_size * math.log1p(-min(rate, 1 - 1e-12))
    return max(1, math.ceil(math.log(1 / miss) / per_batch))


def _quantile_fired(fires: torch.Tensor) -> int:
    """The RATE_QUANTILE quantile (lower) of the fire counts of latents that fired at least once."""
    live = torch.sort(fires[fires > 0]).values
    if len(live) == 0:
        return 0
    return int(live[int(RATE_QUANTILE * (len(live) - 1))])


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
    kept_cells: int = 0  # dictionaries that kept every latent
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
            "quantile of held-out firing rates in the dictionaries that kept every latent, "
            "median over the grid",
            "window": self.window,
            "rate": self.rate,
            "rate_fires": self.fires,
            "rate_cell": list(self.cell) if self.cell else None,
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
    heldout_rows: int | None,
    steps: int | None,
    truth_window: int | None = None,
) -> WindowRule:
    """The dead window a grid's own observables call for, and whether the grid is long enough
    to read any count signal (module docstring)."""
    base = dict(
        batch_size=batch_size, heldout_rows=heldout_rows, steps=steps, truth_window=truth_window
    )
    if not latents:
        return WindowRule(
            None,
            reason="the run saved no per-latent statistics (latents.safetensors beside each "
            "dictionary; runs made before they existed have none): retrain the grid to read it",
            **base,
        )
    if not batch_size or not heldout_rows or steps is None:
        return WindowRule(
            None, reason="the run does not record its batch size, steps or held-out rows", **base
        )
    kept = {k: s for k, s in latents.items() if bool((s["heldout_fires"] > 0).all())}
    pool = kept or latents
    rare = sorted(
        (f, key) for key in pool if (f := _quantile_fired(pool[key]["heldout_fires"])) > 0
    )
    if not rare:
        return WindowRule(None, reason="no latent fired on the held-out rows", **base)
    fires, cell = rare[(len(rare) - 1) // 2]
    rate = fires / heldout_rows
    window = window_for_rate(rate, batch_size)
    rule = WindowRule(window, rate=rate, fires=fires, cell=cell, kept_cells=len(kept), **base)
    if not kept:
        rule.notes.append(
            "no dictionary kept every latent on the held-out rows: r is read over the latents "
            "that fired"
        )
    if fires < MIN_FIRES:
        rule.reason = (
            f"the rare latents' rate is not measured: the latent that sets it fired {fires} "
            f"time(s) on {heldout_rows:,} held-out rows (at least {MIN_FIRES} are needed); "
            "evaluate on more held-out rows (a larger store, or --eval-rows)"
        )
    elif steps < BURN_IN * window:
        rule.reason = (
            f"the grid trained {steps:,} steps; the rule's dead window is {window:,} batches "
            f"of {batch_size:,} (rare kept latents fire on {rate:.2g} of rows), and a count "
            f"needs at least {BURN_IN} windows of training: train at least "
            f"{BURN_IN * window:,} steps"
        )
    return rule


def dead_counts(latents: dict[Key, dict[str, torch.Tensor]], window: int) -> dict[Key, int]:
    """Latents of each dictionary silent for the last ``window`` training batches."""
    return {k: int((s["since_fired"] >= window).sum()) for k, s in latents.items()}


def live_masks(latents: dict[Key, dict[str, torch.Tensor]], window: int) -> dict[Key, torch.Tensor]:
    """(n,) bool per dictionary: latents that fired within the last ``window`` batches."""
    return {k: s["since_fired"] < window for k, s in latents.items()}
