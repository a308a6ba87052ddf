"""Score a trained grid and draw its figures: the glue between the measures and the plots."""

from __future__ import annotations

from pathlib import Path

import torch

from unsuperpose.analyze.figures import curves, heatmap
from unsuperpose.analyze.metrics import mcc, mmcs, mmcs_with_larger, ssll
from unsuperpose.train.io import sparsity_of

Key = tuple[float, int]

# (summary column, figure title, heatmap options); ground-truth ones only where there is one.
GRID_FIGURES = [
    ("mmcs", "MMCS with the ground-truth features", dict(cmap="viridis")),
    ("dead", "dead latents (capped at 100)", dict(cap=100, cmap="magma", fmt=".0f")),
    ("heldout_mse", "held-out reconstruction loss (MSE)", dict(log_color=True, fmt=".2g")),
    ("heldout_l1_loss", "held-out L1 loss", dict(log_color=True, fmt=".2g")),
    ("ssll", "summed standardised log losses", dict(cmap="coolwarm")),
    ("mmcs_larger", "MMCS with larger dictionaries", dict(cmap="viridis")),
    ("heldout_l0", "held-out L0 (active latents per sample)", dict(log_color=True, fmt=".3g")),
    ("heldout_fvu", "held-out fraction of variance unexplained", dict(log_color=True, fmt=".2g")),
    # LM grids only: the SAE spliced into its LM (validation documents)
    ("ce_loss_recovered", "CE loss recovered (vs zero ablation)", dict(cmap="viridis", fmt=".3f")),
    ("delta_ce", "delta CE (nats), SAE spliced in", dict(cmap="magma_r", fmt=".3g")),
    ("kl", "KL(clean || spliced), nats", dict(log_color=True, fmt=".2g")),
]


def score_grid(
    dicts: dict[Key, torch.Tensor],
    metrics: dict[Key, dict],
    ground_truth: torch.Tensor | None = None,
) -> dict[Key, dict[str, float]]:
    """Per SAE: MMCS with larger dictionaries, SSLL, and with ground truth also MMCS and MCC."""
    larger = mmcs_with_larger(dicts)
    stick = ssll(
        {k: m["heldout_mse"] for k, m in metrics.items()},
        {k: m["heldout_l1_loss"] for k, m in metrics.items()},
    )
    scores = {}
    for key, d in dicts.items():
        s = {"mmcs_larger": larger[key], "ssll": stick[key]}
        if ground_truth is not None:
            truth = ground_truth.to(d.device)
            s["mmcs"] = mmcs(truth, d)
            s["mcc"] = mcc(truth, d)
        scores[key] = s
    return scores


def ground_truth_callback(ground_truth: torch.Tensor):
    """A training callback recording MMCS with the ground truth for every SAE."""
    on: dict[torch.device, torch.Tensor] = {}  # the truth copied once to each device it meets

    def fn(step: int, dicts: dict[Key, torch.Tensor]) -> dict[Key, dict[str, float]]:
        out = {}
        for k, d in dicts.items():
            if d.device not in on:
                on[d.device] = ground_truth.to(d.device)
            truth = on[d.device]
            out[k] = {"mmcs": mmcs(truth, d)}
        return out

    return fn


def grid_figures(
    rows: list[dict],
    history: list[dict],
    out: str | Path,
    *,
    size_axis: str,
    size_labels: dict[int, str],
) -> dict[str, Path]:
    """Heatmaps of every column the rows have, and curves of the callback values over steps."""
    out = Path(out)
    paths = {}
    for col, title, opts in GRID_FIGURES:
        values = {(sparsity_of(r), r["dict_size"]): r[col] for r in rows if col in r}
        if values:
            paths[col] = heatmap(
                values,
                out / f"heatmap_{col}.png",
                title=title,
                size_labels=size_labels,
                size_axis=size_axis,
                **opts,
            )
    for metric in ("mmcs",):
        p = curves(
            history,
            metric,
            out / f"curve_{metric}.png",
            title=f"{metric.upper()} over training",
            size_labels=size_labels,
        )
        if p:
            paths[f"curve_{metric}"] = p
    return paths
