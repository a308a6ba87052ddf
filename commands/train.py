"""`unsuperpose train`: a grid of SAEs (knob values x dictionary sizes) on a harvested store.

One pass over the data trains every SAE of the grid. Output:
<out>/<DICT_SIZES>/ with the layout of unsuperpose.train.io, plus saelens/<sae>/ exports.
Rerunning the same command after an interruption resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from unsuperpose import distributed, storage
from unsuperpose.commands._grid import (
    add_run_arguments,
    add_sae_arguments,
    grid_size_text,
    knob_text,
    sae_config,
    train_grid,
)
from unsuperpose.commands.errors import stage_errors
from unsuperpose.commands.flags import alias
from unsuperpose.errors import UserError
from unsuperpose.harvest import ActivationStore, StoreError
from unsuperpose.run_folder import locked_run
from unsuperpose.train import SAETrainConfig
from unsuperpose.train.grid import JUMPRELU_OPTIONS, grid_kept
from unsuperpose.train.layout import set_dirname
from unsuperpose.train.registry import DEFAULT_ARCH
from unsuperpose.train.saelens import export_grid

# Measured on the tiny LM's layer-1 MLP: 1e-4 leaves 40-80 latents active per token, 3e-3 about 7.
DEFAULT_L1 = [round(10 ** (e / 4), 8) for e in range(-14, -7, 2)]  # 3.2e-4 .. 1e-2, half decades
DEFAULT_DICT = "8x"
# The other architectures' knobs on an LM store: k spans the L0 the L1 grid reaches (about 7 to
# 80 active latents per token on the tiny LM's layer 1).
DEFAULT_TOPK = [8, 16, 32, 64]
DEFAULT_L0_COEF = [1e-3, 3e-3, 1e-2, 3e-2]
# The grid's knob values by knob name (an architecture whose knob is not here, or whose values
# live on another scale, brings its own: ``Family.default_values``, ``Knob.defaults``).
DEFAULT_KNOBS = {"l1": DEFAULT_L1, "k": DEFAULT_TOPK, "l0_coef": DEFAULT_L0_COEF}
DEFAULT_STEPS = 10_000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train SAE grids on a harvested activation store",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--store",
        type=storage.location,
        required=True,
        help="a store written by `unsuperpose harvest` (a folder or s3://bucket/prefix/layer1.zarr)",
    )
    p.add_argument(
        "--out",
        type=storage.location,
        required=True,
        help="parent folder or s3://bucket/prefix; the grid goes to <out>/<DICT_SIZES> "
        "(commas in --dict-sizes become '+'); on S3 the run works in a local mirror copied "
        "up after every checkpoint and at the end",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="train on this many activations (sets --steps = tokens / batch size)",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="train on the complete chunks of a store whose harvest has not finished",
    )
    p.add_argument(
        "--splice-tokens",
        type=int,
        default=16_384,
        help="predicted tokens of the LM's validation documents for the spliced-in "
        "evaluation of every SAE (CE loss recovered, delta CE, KL) in summary.csv; 0: skip",
    )
    add_sae_arguments(
        p,
        dict_flag="--dict-sizes",
        dict_help=f"dictionary sizes: ratios of the store width d (e.g. 8x or "
        f"1x,2x,4x,8x) or absolute latents (4096); default {DEFAULT_DICT}",
        defaults=default_config(),
        knob_defaults=DEFAULT_KNOBS,
    )
    add_run_arguments(p)
    alias(p, "--dict", "--dict-sizes")  # --dict is a saved dictionary's folder in analyze
    p.set_defaults(func=run)


def default_config() -> SAETrainConfig:
    """The SAE settings of `unsuperpose train` before any flag (what --help shows)."""
    return SAETrainConfig(
        steps=DEFAULT_STEPS,
        jumprelu=JUMPRELU_OPTIONS,
    )


def dict_folder(spec: str, arch: str = DEFAULT_ARCH) -> str:
    """<DICT> for the default architecture (as runs have always been named), <arch>-<DICT> for
    the others, so grids of two architectures never share a folder."""
    return set_dirname(spec, arch)


def kept(args: argparse.Namespace) -> str:
    """What the grid's folder keeps across an I/O fault (the CLI's one-line error says it)."""
    spec = getattr(args, "dict", None) or DEFAULT_DICT
    return grid_kept(args.out / dict_folder(spec, getattr(args, "arch", DEFAULT_ARCH)))


def run(args: argparse.Namespace) -> int:
    storage.check_access(args.store)  # an endpoint that does not answer says so at once
    if not storage.exists(args.store):
        raise UserError(f"no store at {args.store}: harvest one first, e.g. `make harvest LAYER=1`")
    spec = getattr(args, "dict", None) or DEFAULT_DICT
    out = args.out / dict_folder(spec, getattr(args, "arch", DEFAULT_ARCH))
    # A store that cannot be read (unfinished, corrupt, all held out) is said as the store says it.
    with (
        locked_run(out, args.device) as placement,
        stage_errors(StoreError, {"allow_incomplete": "--allow-incomplete"}),
    ):
        return _train(args, out, placement)


def _train(args: argparse.Namespace, out, placement: distributed.Placement) -> int:
    store = ActivationStore(args.store, allow_incomplete=args.allow_incomplete)
    cfg, labels = sae_config(
        args,
        base=default_config(),
        dict_base=store.d,
        knob_defaults=DEFAULT_KNOBS,
        default_dict=DEFAULT_DICT,
    )
    if args.tokens is not None:
        if args.tokens < cfg.batch_size:
            raise UserError(f"--tokens {args.tokens} is less than one batch ({cfg.batch_size})")
        cfg.steps = math.ceil(args.tokens / cfg.batch_size)
    info = store.describe()
    print(
        f"store {args.store}: {store.rows:,} rows of width {store.d}; {grid_size_text(cfg)}, "
        f"{cfg.steps:,} "
        f"steps of {cfg.batch_size} ({cfg.steps * cfg.batch_size / store.train_rows:.2f} epochs "
        f"of its {store.train_rows:,} training rows; "
        f"{store.heldout_rows():,} held out: {store.heldout_description})"
    )

    def export(state, folder: Path) -> None:
        refused = export_grid(state, folder, cfg, info)
        if refused:
            print(refused)

    def spliced(state) -> dict:
        from unsuperpose.analyze.splice_grid import splice_columns

        if args.splice_tokens <= 0:
            return {}
        saes = state.saes()
        print(
            f"spliced-in evaluation of {len(saes)} SAEs on {args.splice_tokens:,} tokens "
            "of the LM's validation documents"
        )
        return splice_columns(
            saes, store, args.splice_tokens, progress=not args.no_progress, device=state.device
        )

    rows = train_grid(
        store,
        cfg,
        out,
        size_labels=labels,
        size_base=store.d,
        more_scores=spliced,
        size_axis="dictionary size (x d, the activation width)",
        wandb_mode=args.wandb,
        progress=not args.no_progress,
        run_name=f"sae-{out.parent.name}-{out.name}",
        source_info=info,
        checkpoint_every=args.checkpoint_every,
        force=args.force,
        export=export,
        placement=placement,
        parallel_mode=args.parallel,
    )
    best = min(rows, key=lambda r: r["heldout_fvu"])
    dead = f"{best['dead']} dead" if "dead" in best else f"{best['heldout_dead']} silent held out"
    wrote = "summary.csv, figures/, saes/" + (", saelens/" if cfg.family.saelens else "")
    print(
        f"lowest held-out FVU {best['heldout_fvu']:.4f} on {best['heldout_rows']:,} rows "
        f"({knob_text(best)}, {best['dict_label']}, L0 {best['heldout_l0']:.1f}, "
        f"{dead}); wrote {out}/{wrote}"
    )
    return 0
