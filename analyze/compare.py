"""Toy and LM side by side: one figure per diagnostic, the two grids drawn the same way.

Both panels put L1 on the vertical axis (smallest at the bottom) and the dictionary size on the
horizontal one as a ratio — of the G ground-truth features for toy data, of the activation width
d for the LM — so that "dead latents appear past 1x" reads the same in both. Each panel marks
the cell(s) its diagnostic points to with a box, and the toy panel marks the ground-truth optimum
(best MMCS with the true features) with a star.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from unsuperpose.analyze.diagnostics import Diagnosis  # noqa: E402
from unsuperpose.analyze.figures import heatmap, save_figure  # noqa: E402

Key = tuple[float, int]

# (diagnostic, summary column, panel title, heatmap options)
COMPARISONS = [
    ("dead", "dead", "dead latents (capped at 100)", dict(cap=100, cmap="magma", fmt=".0f")),
    ("ssll", "ssll", "loss stickiness: summed standardised log losses", dict(cmap="coolwarm")),
    ("mmcs_larger", "mmcs_larger", "MMCS with larger dictionaries", dict(cmap="viridis")),
]


def ratio_label(n: int, base: int) -> str:
    """Size ``n`` as a ratio of ``base``: '8x', '1/4x', or '1.5x' when neither reads cleanly."""
    r = Fraction(n, base)
    if r.denominator == 1:
        return f"{r.numerator}x"
    if r.numerator == 1:
        return f"1/{r.denominator}x"
    return f"{float(r):.3g}x"


def size_labels(sizes, base: int) -> dict[int, str]:
    return {n: ratio_label(n, base) for n in sizes}


def _box(ax, values: dict[Key, float], key: Key | None, color: str, lw: float = 2.5) -> None:
    if key is None or key not in values:
        return
    l1s = sorted({a for a, _ in values})
    sizes = sorted({n for _, n in values})
    i, j = l1s.index(key[0]), sizes.index(key[1])
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=lw))


def _star(ax, values: dict[Key, float], key: Key | None) -> None:
    if key is None or key not in values:
        return
    l1s = sorted({a for a, _ in values})
    sizes = sorted({n for _, n in values})
    # In the cell's corner, so the value printed in the cell stays readable.
    ax.plot(
        sizes.index(key[1]) + 0.32,
        l1s.index(key[0]) + 0.3,
        marker="*",
        markersize=13,
        color="white",
        markeredgecolor="black",
    )


def mark(ax, diagnostic: str, values: dict[Key, float], diag: Diagnosis) -> None:
    """Box what ``diagnostic`` points to in this panel (nothing below the minimum evidence: there
    is no reading to box); star the ground-truth optimum if any."""
    if diag.rule is not None and not diag.rule.readable:
        pass
    elif diagnostic == "dead":
        for a, n in diag.dead.per_knob.items():
            _box(ax, values, (a, n) if n is not None else None, "cyan", lw=1.8)
    else:
        name = {"ssll": "loss stickiness (SSLL)", "mmcs_larger": "MMCS with larger dictionaries"}[
            diagnostic
        ]
        p = next(p for p in diag.pointers if p.diagnostic == name)
        _box(ax, values, (p.knob, p.size) if p.size is not None else None, "cyan")
    _star(ax, values, diag.optimum)


def side_by_side(
    toy: dict[Key, float],
    lm: dict[Key, float],
    path: str | Path,
    *,
    diagnostic: str,
    title: str,
    toy_base: int,
    lm_base: int,
    toy_diag: Diagnosis | None,
    lm_diag: Diagnosis | None,
    opts: dict,
    lm_name: str = "LM",
) -> Path:
    """One figure, toy on the left and the LM on the right (an empty panel says what is missing)."""
    panels = [
        ("toy data", toy, toy_base, f"ratio to G = {toy_base} ground-truth features", toy_diag),
        (lm_name, lm, lm_base, f"ratio to d = {lm_base}, the activation width", lm_diag),
    ]
    width = sum(1.0 * len({n for _, n in v}) + 2.8 for _, v, *_ in panels if v) or 8
    height = 0.45 * max([len({a for a, _ in v}) for _, v, *_ in panels if v] or [4]) + 2.4
    fig, axes = plt.subplots(1, 2, figsize=(max(width, 9), height))
    for ax, (name, values, base, unit, diag) in zip(axes, panels):
        if not values:
            ax.axis("off")
            ax.text(0.5, 0.5, f"no {name} grid", ha="center", va="center")
            continue
        heatmap(
            values,
            None,
            title=f"{name}: {title}",
            ax=ax,
            size_labels=size_labels({n for _, n in values}, base),
            size_axis=f"dictionary size ({unit})",
            **opts,
        )
        if diag is not None:
            mark(ax, diagnostic, values, diag)
    fig.text(
        0.5,
        0.005,
        "boxes: where the diagnostic points; star: the toy ground-truth optimum "
        "(best MMCS with the true features)",
        ha="center",
        fontsize=8,
    )
    return save_figure(fig, path, rect=(0, 0.03, 1, 1))
