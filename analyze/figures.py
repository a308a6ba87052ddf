"""The report's figures: heatmaps over (L1 x dictionary size) and metric-vs-steps curves.

Rows are L1 values (smallest at the bottom, as in the report), columns dictionary sizes labelled
with the ratio the user gave (e.g. '1/8x' of G for toy data, '8x' of d for an LM).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from unsuperpose.config import write_bytes_atomic  # noqa: E402
from unsuperpose.train.io import sparsity_of  # noqa: E402


def save_figure(fig, path: str | Path, rect: tuple | None = None) -> Path:
    """Write ``fig`` as PNG, or the format the suffix names (creating folders), and free it:
    figures are many, memory is not. ``rect``: the area tight_layout may fill (room left for a
    footnote)."""
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    # Whole or not at all, as every other file: a full disk must not leave half a PNG behind.
    return write_bytes_atomic(path, buf.getvalue())


def grid_matrix(
    values: dict[tuple[float, int], float], l1s: list[float], sizes: list[int]
) -> np.ndarray:
    """(len(l1s), len(sizes)) array of ``values``; NaN where a cell is missing."""
    m = np.full((len(l1s), len(sizes)), np.nan)
    for i, a in enumerate(l1s):
        for j, n in enumerate(sizes):
            v = values.get((a, n))
            m[i, j] = np.nan if v is None else float(v)
    return m


def heatmap(
    values: dict[tuple[float, int], float],
    path: str | Path,
    *,
    title: str,
    size_labels: dict[int, str],
    size_axis: str,
    cap: float | None = None,
    cmap: str = "viridis",
    fmt: str = ".2f",
    log_color: bool = False,
    ax=None,
) -> Path | None:
    """Draw one heatmap; with ``ax`` draw into it (for side-by-side figures) and return None."""
    l1s = sorted({a for a, _ in values})
    sizes = sorted({n for _, n in values})
    m = grid_matrix(values, l1s, sizes)
    if cap is not None:
        m = np.minimum(m, cap)
    shown = np.log10(np.where(m > 0, m, np.nan)) if log_color else m
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(1.1 * len(sizes) + 2.5, 0.45 * len(l1s) + 2))
    finite = shown[np.isfinite(shown)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0, 1)
    if vmax == vmin:  # a constant grid (e.g. no dead latents anywhere): a scale that contains it
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = ax.imshow(shown, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(sizes)), [size_labels.get(n, str(n)) for n in sizes], rotation=45)
    ax.set_yticks(range(len(l1s)), [f"{a:.3g}" for a in l1s])
    ax.set_xlabel(size_axis)
    ax.set_ylabel("L1 coefficient")
    ax.set_title(title)
    if m.size <= 200:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if math.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        format(m[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if shown[i, j] < (vmin + vmax) / 2 else "black",
                    )
    cbar = ax.figure.colorbar(im, ax=ax)
    if log_color:
        cbar.set_label("log10")
    if not own:
        return None
    return save_figure(fig, path)


def curves(
    history: list[dict], metric: str, path: str | Path, *, title: str, size_labels: dict[int, str]
) -> Path | None:
    """One panel per dictionary size, one line per L1: ``metric`` against training steps."""
    rows = [h for h in history if metric in h]
    if not rows:
        return None
    sizes = sorted({h["dict_size"] for h in rows})
    l1s = sorted({sparsity_of(h) for h in rows})
    colors = plt.cm.plasma(np.linspace(0, 0.9, len(l1s)))
    cols = min(len(sizes), 4)
    nrows = math.ceil(len(sizes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False, sharey=True)
    for ax, n in zip(axes.flat, sizes):
        for color, a in zip(colors, l1s):
            pts = sorted(
                (h["step"], h[metric]) for h in rows if h["dict_size"] == n and sparsity_of(h) == a
            )
            if pts:
                ax.plot(*zip(*pts), color=color, label=f"{a:.3g}")
        ax.set_title(f"dictionary {size_labels.get(n, n)} ({n} latents)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sizes) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel(metric)
    axes[0, 0].legend(title="L1", fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def frontier(
    rows: list[dict],
    y: str,
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    size_labels: dict[int, str],
    references: dict[str, tuple[float, float]] | None = None,
    log_y: bool = False,
) -> Path | None:
    """The sparsity-fidelity frontier: L0 (held-out) against ``y``, one line per dictionary size
    (its points are the L1 values), and labelled reference points (e.g. the neuron basis, the
    zero and mean ablations) as {label: (l0, y)}."""
    pts = [
        (r["dict_size"], r["heldout_l0"], r[y])
        for r in rows
        if isinstance(r.get(y), (int, float))
        and math.isfinite(r[y])
        and r.get("heldout_l0") is not None
    ]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("viridis")
    sizes = sorted({p[0] for p in pts})
    for i, n in enumerate(sizes):
        line = sorted((l0, v) for m, l0, v in pts if m == n)
        ax.plot(
            [a for a, _ in line],
            [b for _, b in line],
            marker="o",
            ms=4,
            color=cmap(i / max(len(sizes) - 1, 1)),
            label=size_labels.get(n, str(n)),
        )
    for k, (label, (l0, v)) in enumerate((references or {}).items()):
        if math.isfinite(v):
            ax.scatter([max(l0, 0.5)], [v], marker="*s^"[k % 3], s=90, color="black", zorder=5)
            # Reference points often coincide (both ablations keep nothing): stagger their labels.
            ax.annotate(
                label,
                (max(l0, 0.5), v),
                textcoords="offset points",
                xytext=(8, 6 - 11 * k),
                fontsize=8,
            )
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("L0: active latents per token (held-out; log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(title="dictionary", fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
