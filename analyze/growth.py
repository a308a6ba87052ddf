"""Whether a ReLU grid must grow: the default dead-neuron reading, open at its largest size.

The dead-neuron diagnostic points at the size where a dictionary starts losing latents. While the
largest dictionary trained at some L1 still keeps them (within ``DEFAULT_TOLERANCE``), the
pointer is only a lower bound there, and a larger dictionary is the evidence that would close it.
A pipeline that grows its grid one size at a time (``unsuperpose demo``) asks this after each.
"""

from __future__ import annotations

from pathlib import Path

from unsuperpose.analyze.diagnostics import DEFAULT_TOLERANCE, dead_boundary
from unsuperpose.train.io import read_summary
from unsuperpose.train.layout import SUMMARY_FILE, is_complete

__all__ = ["alive_at_largest", "fails_text", "passes_text", "trained_sizes"]


def _finished_rows(sets_dir: str | Path) -> list[dict]:
    """The ReLU rows of every complete set under ``sets_dir``: the fitted baselines beside them
    (neurons, PCA) and the k-architectures have no L1 and no dead-neuron boundary to grow."""
    rows = []
    for summary in sorted(Path(sets_dir).glob(f"*/{SUMMARY_FILE}")):
        if is_complete(summary.parent):
            rows += [
                r
                for r in read_summary(summary)
                if {"dead", "dict_size", "l1"} <= r.keys() and r.get("arch", "relu") == "relu"
            ]
    return rows


def trained_sizes(sets_dir: str | Path) -> list[int]:
    """The ReLU dictionary sizes trained to the end under ``sets_dir``, ascending."""
    return sorted({int(r["dict_size"]) for r in _finished_rows(sets_dir)})


def alive_at_largest(sets_dir: str | Path) -> list[float]:
    """L1 values at which the largest dictionary trained so far (over every complete set under
    ``sets_dir``) passes the default dead-neuron reading: there the evidence is open-ended and
    the grid must grow."""
    dead = {
        (float(r["l1"]), int(r["dict_size"])): float(r["dead"]) for r in _finished_rows(sets_dir)
    }
    return sorted(dead_boundary(dead, DEFAULT_TOLERANCE).all_alive)


def passes_text() -> str:
    """What passing the default reading means, in words."""
    if DEFAULT_TOLERANCE == 0:
        return "has no dead latent"
    return f"keeps at least {1 - DEFAULT_TOLERANCE:.1%} of its latents"


def fails_text() -> str:
    """What failing the default reading means, in words."""
    if DEFAULT_TOLERANCE == 0:
        return "has dead latents"
    return f"loses more than {DEFAULT_TOLERANCE:.1%} of its latents"
