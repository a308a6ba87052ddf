"""What `unsuperpose toy` and `unsuperpose train` share: SAE flags, and training + saving a grid."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from unsuperpose.analyze import grid_figures, score_grid
from unsuperpose.config import add_arguments, to_dict
from unsuperpose.errors import UserError
from unsuperpose.tracking import Tracker
from unsuperpose.train import (PRESETS, Callback, SAETrainConfig, apply_preset, evaluate, new_state,
                               parse_dict_sizes, parse_l1_list, save_grid, train_steps)

SKIP = ("l1", "dict_sizes")  # parsed from --l1 / --dict so that ratios and lists get clear errors


def add_sae_arguments(parser: argparse.ArgumentParser, *, dict_flag: str, dict_help: str,
                      skip: tuple[str, ...] = ()) -> None:
    parser.add_argument("--l1", type=str, default=None, help="L1 coefficients, comma-separated "
                        "(e.g. 1e-4,3e-4,1e-3)")
    parser.add_argument(dict_flag, dest="dict", type=str, default=None, help=dict_help)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="'report': the 2022 report's settings (Adam 1e-3, batch 256, per-latent "
                        "L1, nn.Linear-style encoder init); flags given explicitly still win")
    parser.add_argument("--wandb", choices=["offline", "online", "disabled"], default=None,
                        help="W&B mode (default: $WANDB_MODE, else offline; online needs `wandb login`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(parser, SAETrainConfig, skip=SKIP + skip)


def sae_config(args: argparse.Namespace, *, base: SAETrainConfig, dict_base: int,
               default_l1: list[float], default_dict: str) -> tuple[SAETrainConfig, dict[int, str]]:
    """Defaults < preset < explicit flags; returns the config and each size's label."""
    try:
        l1 = parse_l1_list(args.l1) if args.l1 else default_l1
        sizes = parse_dict_sizes(args.dict or default_dict, dict_base)
        cfg = apply_preset(base, args.preset)
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SAETrainConfig)
                 if f.name not in SKIP and hasattr(args, f.name)}
        cfg = dataclasses.replace(cfg, l1=l1, dict_sizes=[n for _, n in sizes], **given)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return cfg, {n: label for label, n in sizes}


def train_and_save(source, cfg: SAETrainConfig, out: Path, *, size_labels: dict[int, str],
                   size_base: int, size_axis: str, ground_truth=None, callbacks: list[Callback] = (),
                   wandb_mode: str | None = None, progress: bool = True, run_name: str,
                   source_info: dict) -> list[dict]:
    """Train the grid, score it (with ground truth if given), save SAEs, summary and figures."""
    out.mkdir(parents=True, exist_ok=True)
    with Tracker(out, name=run_name, config={"train": to_dict(cfg), "source": source_info},
                 mode=wandb_mode) as tracker:
        state = new_state(source, cfg)
        train_steps(state, source, callbacks=callbacks, progress=progress,
                    on_log=lambda row: tracker.log(row, step=row["step"]))
        metrics = evaluate(state, source)
        scores = score_grid(state.dictionaries(), metrics, ground_truth)
        for (l1, n), s in scores.items():
            s["dict_ratio"] = n / size_base
        rows = save_grid(state, metrics, out, extra=scores, labels=size_labels, source_info=source_info)
        figures = grid_figures(rows, state.history, out / "figures", size_axis=size_axis,
                               size_labels=size_labels)
        columns = list(rows[0])
        tracker.log_table("summary", columns, [[r.get(c) for c in columns] for r in rows])
        tracker.log_images({f"figures/{k}": v for k, v in figures.items()})
    return rows
