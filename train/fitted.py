"""Fitting a grid of baseline dictionaries (neurons, PCA, ICA, sparse coding, random) instead of
training one: what ``trainer.py`` is for the SAE architectures.

A fitted method sees the rows an SAE of the same settings would train on: the first ``steps``
batches of ``batch_size`` of the run's stream (``data_seed``), so a run's identity is its data
and its budget whichever method it holds. Methods that cannot stream hold a capped prefix of
those rows in memory (ICA: ``ica.rows``), and say how many they used (``fit_rows``).

Fitting is not resumable: a killed fit starts again from nothing. It is cheap enough not to need
a checkpoint (seconds for neurons, PCA and random directions, a minute or two for ICA on this
project's stores; sparse coding streams its budget once, like an SAE grid), and nothing is
written before the last dictionary is fitted.

Under torchrun the whole grid is fitted by rank 0 (the other ranks wait for its rows): a fit is
one pass, not worth splitting.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from unsuperpose import distributed
from unsuperpose.train.config import SAETrainConfig
from unsuperpose.train.heldout import heldout_rows, one, score
from unsuperpose.train.registry import get_family
from unsuperpose.train.source import ActivationSource, check_source


class FitData:
    """The training rows of a fitted run: streamed batches, a capped in-memory sample, moments.

    Every method reads the same stream, so two fits of one run see the same rows in the same
    order; moments are computed once and shared by the sizes and methods of the grid.
    """

    def __init__(
        self,
        source: ActivationSource,
        config: SAETrainConfig,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ):
        self.source = check_source(source)
        self.progress = progress
        self.config = config
        self.d = int(source.d)
        self.device = torch.device(device)
        self.batch_size = config.batch_size
        self.rows = config.steps * config.batch_size
        self._moments: tuple[torch.Tensor, torch.Tensor] | None = None

    def stream(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        """The first ``rows`` training rows (default: the whole budget) as float32 batches on
        ``device``; the last batch is cut to fit."""
        left = self.rows if rows is None else min(rows, self.rows)
        for x in self.source.batches(self.batch_size, seed=self.config.data_seed):
            if left <= 0:
                return
            x = x[:left].to(self.device, torch.float32)
            left -= len(x)
            yield x

    def sample(self, rows: int) -> torch.Tensor:
        """The first ``min(rows, budget)`` training rows, in one tensor."""
        return torch.cat(list(self.stream(rows)))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (d,), covariance (d, d)) of every training row, accumulated in float64."""
        if self._moments is None:
            total = torch.zeros(self.d, dtype=torch.float64, device=self.device)
            outer = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
            n = 0
            for x in self.bar(self.stream(), total=self.config.steps, desc="moments", unit="batch"):
                x = x.double()
                total += x.sum(0)
                outer += x.T @ x
                n += len(x)
            mean = total / n
            cov = outer / n - torch.outer(mean, mean)
            self._moments = (mean, cov)
        return self._moments

    def bar(self, iterable: Iterable | None = None, **kwargs) -> tqdm:
        """A progress bar for a fit (``total``, ``desc``, ``unit``, as tqdm's), drawn when the grid
        was asked for progress (commands: unless --no-progress) and only on rank 0; in a log file
        (no terminal) redrawn at most every 30 s, as the trainer's."""
        return tqdm(
            iterable,
            disable=not self.progress or not distributed.is_main(),
            dynamic_ncols=True,
            leave=False,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
            **kwargs,
        )


@dataclass
class FittedGrid:
    """A fitted grid, shaped like the trainer's state where ``save_grid`` and scoring read it."""

    config: SAETrainConfig
    d: int
    fitted: dict[tuple[float, int], object]
    info: dict[tuple[float, int], dict] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    history: list[dict] = field(default_factory=list)

    @property
    def step(self) -> int:  # the budget the fit was given, in batches (what an SAE would train)
        return self.config.steps

    def keys(self) -> list[tuple[float, int]]:
        return list(self.fitted)

    def saes(self) -> dict[tuple[float, int], object]:
        return dict(self.fitted)

    def dictionaries(self) -> dict[tuple[float, int], torch.Tensor]:
        with torch.no_grad():
            return {k: v.atoms().detach() for k, v in self.fitted.items()}


def fit_grid(
    source: ActivationSource,
    config: SAETrainConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> FittedGrid:
    """Every (knob value, size) dictionary of ``config``'s fitted method, on ``device``."""
    family = get_family(config.arch)
    if not family.fitted:
        raise ValueError(f"{config.arch} is trained, not fitted: use train.train_steps")
    data = FitData(source, config, distributed.with_index(device), progress=progress)
    if family.check_sizes is not None:
        family.check_sizes(data.d, sorted(config.dict_sizes))
    grid = FittedGrid(config=config, d=data.d, fitted={}, device=data.device)
    for n in sorted(config.dict_sizes):
        started = time.perf_counter()
        by_value = family.fit(data, config, n)
        seconds = time.perf_counter() - started
        if progress:
            print(f"fitted {config.arch} n={n}: {len(by_value)} dictionaries in {seconds:.1f} s")
        for value in config.sparsity:
            dictionary = by_value[value]
            grid.fitted[(value, n)] = dictionary
            rows = dictionary.config.get("fit_rows", data.rows)
            grid.info[(value, n)] = {"fit_rows": int(rows), "fit_seconds": round(seconds, 3)}
    return grid


@torch.no_grad()
def evaluate_dictionaries(
    saes: dict[tuple[float, int], object],
    source: ActivationSource,
    config: SAETrainConfig,
    device: torch.device | str = "cpu",
) -> dict[tuple[float, int], dict]:
    """The held-out metrics (``heldout.score``, the trainer's too) of any dictionaries, one by
    one. A fitted method has no training window, so ``dead`` (the training-time count) is not
    defined for it and left out."""
    held = heldout_rows(source, config.batch_size, config.eval_rows, torch.device(device))
    return {key: score(held, one(sae), 1, sae.d_sae)[0][0] for key, sae in saes.items()}
