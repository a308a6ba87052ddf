"""The feature browser's numbers: one streaming pass over a store for many dictionaries at once.

For every unit (an SAE latent, or an MLP neuron as the baseline) it gathers its firing frequency
(fraction of rows with activation > 0), mean and max activation, a histogram of its positive
activations and its top-k rows, then the tokens around those rows. Memory is bounded: rows are
read ``batch_rows`` at a time and only per-unit summaries are kept, whatever the store's length.

The histogram uses fixed log2-spaced bins (``BINS_PER_OCTAVE`` per factor of two, 2^-16..2^16)
so that one pass suffices: linear bins would need every unit's maximum before the first count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from unsuperpose import storage
from unsuperpose.harvest import bf16_to_torch

BINS_PER_OCTAVE = 4


class BrowserError(ValueError):
    """A feature browser that cannot be built: a store without tokens, a dictionary of another
    width than its store, settings out of range."""


LOG2_LO, LOG2_HI = -16, 16
N_BINS = (LOG2_HI - LOG2_LO) * BINS_PER_OCTAVE

Encoder = Callable[[torch.Tensor], torch.Tensor]  # (rows, d) float32 -> (rows, units) activations


def bin_edges() -> np.ndarray:
    """The N_BINS + 1 activation values bounding the histogram bins."""
    return 2.0 ** (LOG2_LO + np.arange(N_BINS + 1) / BINS_PER_OCTAVE)


@dataclass
class UnitStats:
    """Per-unit summaries over ``rows`` rows of a store."""

    rows: int
    count: np.ndarray  # (units,) rows with activation > 0
    total: np.ndarray  # (units,) sum of positive activations
    max: np.ndarray  # (units,) largest activation (0 if it never fired)
    hist: np.ndarray  # (units, N_BINS) counts of positive activations on log2 bins
    top_vals: np.ndarray  # (units, k) descending; 0 where fewer than k rows fired
    top_rows: np.ndarray  # (units, k) store rows of top_vals

    @property
    def units(self) -> int:
        return len(self.count)

    @property
    def freq(self) -> np.ndarray:
        return self.count / max(self.rows, 1)

    @property
    def mean_active(self) -> np.ndarray:
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), 0.0)


class _Accumulator:
    def __init__(self, units: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.count = torch.zeros(units, dtype=torch.int64, device=device)
        self.total = torch.zeros(units, dtype=torch.float64, device=device)
        self.max = torch.zeros(units, device=device)
        self.hist = torch.zeros(units * N_BINS, dtype=torch.int64, device=device)
        self.top_vals = torch.zeros(k, units, device=device)
        self.top_rows = torch.zeros(k, units, dtype=torch.int64, device=device)

    def add(self, acts: torch.Tensor, lo: int) -> None:
        pos = acts.clamp_min(0)
        active = acts > 0
        self.count += active.sum(0)
        self.total += pos.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, pos.max(0).values)
        r, u = active.nonzero(as_tuple=True)
        if len(u):
            b = (
                torch.log2(acts[r, u]) * BINS_PER_OCTAVE
            ).floor().long() - LOG2_LO * BINS_PER_OCTAVE
            self.hist += torch.bincount(
                u * N_BINS + b.clamp_(0, N_BINS - 1), minlength=len(self.hist)
            )
        # Top-k across batches: the running top k and this batch compete together.
        rows = (
            torch.arange(lo, lo + len(acts), device=acts.device)
            .unsqueeze(1)
            .expand(-1, acts.shape[1])
        )
        vals = torch.cat([self.top_vals, pos])
        idx = torch.cat([self.top_rows, rows])
        self.top_vals, pick = vals.topk(self.k, dim=0)
        self.top_rows = idx.gather(0, pick)

    def stats(self, rows: int) -> UnitStats:
        host = lambda t: t.cpu().numpy()  # noqa: E731
        return UnitStats(
            rows=rows,
            count=host(self.count),
            total=host(self.total),
            max=host(self.max),
            hist=host(self.hist.view(-1, N_BINS)),
            top_vals=host(self.top_vals.T.contiguous()),
            top_rows=host(self.top_rows.T.contiguous()),
        )


def scan(
    store,
    encoders: dict[str, Encoder],
    *,
    top: int = 20,
    batch_rows: int = 4096,
    max_rows: int | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, UnitStats]:
    """Stream ``store`` (``.rows``, ``.read_rows(lo, hi)``) once through every encoder (which
    take inputs on ``device``; the statistics are gathered there too)."""
    if top < 1 or batch_rows < 1:
        raise BrowserError(f"top={top} and batch_rows={batch_rows}: each must be at least 1")
    rows = min(store.rows, max_rows) if max_rows else store.rows
    acc: dict[str, _Accumulator] = {}
    bar = tqdm(total=rows, unit="row", unit_scale=True, desc="features", disable=not progress)
    with torch.inference_mode():
        for lo in range(0, rows, batch_rows):
            hi = min(rows, lo + batch_rows)
            x = bf16_to_torch(store.read_rows(lo, hi)).float().to(device)
            for name, enc in encoders.items():
                acts = enc(x)
                if name not in acc:
                    acc[name] = _Accumulator(acts.shape[1], top, acts.device)
                acc[name].add(acts, lo)
            bar.update(hi - lo)
    bar.close()
    return {name: a.stats(rows) for name, a in acc.items()}


# -- contexts ----------------------------------------------------------------------------------


@dataclass
class Context:
    """The tokens around one top-activating row; ``at`` indexes the row's own token."""

    row: int
    act: float
    tokens: list[int]
    at: int


def token_arrays(path) -> tuple[zarr.Array, zarr.Array]:
    """The store's ``tokens`` and ``positions`` arrays, or a BrowserError naming the fix."""
    group = storage.open_zarr_group(storage.location(path), mode="r")  # local or s3://
    missing = [n for n in ("tokens", "positions") if n not in group]
    if missing:
        raise BrowserError(
            f"{path} kept no {' or '.join(missing)} (only activations), so there is "
            "no text to show; harvest the store again with `unsuperpose harvest`, "
            "which keeps the token of every row"
        )
    return group["tokens"], group["positions"]


def gather(array: zarr.Array, wanted: np.ndarray, step: int) -> np.ndarray:
    """``array[wanted]`` for sorted unique indices, reading ``step`` rows at a time."""
    out = np.empty(len(wanted), dtype=array.dtype)
    for lo in range(0, int(wanted[-1]) + 1 if len(wanted) else 0, step):
        a, b = np.searchsorted(wanted, [lo, lo + step])
        if a < b:
            out[a:b] = array[lo : min(lo + step, array.shape[0])][wanted[a:b] - lo]
    return out


def spans(
    path, rows: np.ndarray, *, left: int, right: int, step: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """For sorted unique store ``rows``: the first and last row of each one's excerpt, up to
    ``left``/``right`` tokens around it, cut at the edges of the context block it came from: a
    store holds whole blocks of n_ctx tokens in order, so the row at position p of its block has
    its block start p rows earlier."""
    tokens, positions = token_arrays(path)
    n = tokens.shape[0]
    n_ctx = int(storage.open_zarr_group(storage.location(path), mode="r").attrs.get("n_ctx") or n)
    start = rows - gather(positions, rows, step)
    lo = np.maximum(rows - left, start)
    hi = np.minimum(np.minimum(rows + right, start + n_ctx - 1), n - 1)
    return lo, hi


def span_rows(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Every row of the spans ``lo[i]..hi[i]`` (inclusive), sorted and unique."""
    parts = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def contexts(
    stats: dict[str, UnitStats], path, *, left: int = 10, right: int = 4, step: int = 1 << 16
) -> dict[str, list[list[Context]]]:
    """For every unit of every scan, its top rows with up to ``left``/``right`` tokens around
    each, within the row's context block (``spans``)."""
    tokens, _ = token_arrays(path)
    tops = [s.top_rows[s.top_vals > 0] for s in stats.values()]
    top_rows = np.unique(np.concatenate(tops)) if tops else np.zeros(0, np.int64)
    lo, hi = spans(path, top_rows, left=left, right=right, step=step)
    wanted = span_rows(lo, hi)
    tok = gather(tokens, wanted, step)

    def window(r: int) -> tuple[list[int], int]:
        i = int(np.searchsorted(top_rows, r))
        a, b = np.searchsorted(wanted, [lo[i], hi[i] + 1])
        return [int(t) for t in tok[a:b]], int(r - lo[i])

    out: dict[str, list[list[Context]]] = {}
    for name, s in stats.items():
        per_unit = []
        for u in range(s.units):
            ctxs = []
            for v, r in zip(s.top_vals[u], s.top_rows[u]):
                if v <= 0:
                    break
                toks, at = window(int(r))
                ctxs.append(Context(row=int(r), act=float(v), tokens=toks, at=at))
            per_unit.append(ctxs)
        out[name] = per_unit
    return out


def firing_summary(s: UnitStats) -> dict:
    """Headline numbers of one scan: dead units and the spread of firing frequencies."""
    alive = s.count > 0
    f = s.freq[alive]
    return {
        "units": s.units,
        "rows": s.rows,
        "never_fired": int((~alive).sum()),
        "median_freq": float(np.median(f)) if len(f) else math.nan,
        "max_freq": float(f.max()) if len(f) else math.nan,
    }
