"""`unsuperpose toy`: the report's toy replication — a grid of SAEs on data with known features."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from unsuperpose import distributed, storage
from unsuperpose.analyze import ground_truth_callback
from unsuperpose.analyze.diagnostics import read_record
from unsuperpose.analyze.report import toy_record
from unsuperpose.commands._grid import (
    add_run_arguments,
    add_sae_arguments,
    grid_size_text,
    knob_text,
    sae_config,
    train_grid,
)
from unsuperpose.commands.errors import flags_of, stage_errors
from unsuperpose.commands.flags import alias, rename
from unsuperpose.config import add_arguments, from_args, write_json_atomic
from unsuperpose.errors import UserError
from unsuperpose.run_folder import check_run_folder, locked_run
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.toy.defaults import (
    DEFAULT_DICT,
    DEFAULT_L0_COEF,
    DEFAULT_L1,
    DEFAULT_STEPS,
    DEFAULT_TOPK,
    PAPER_DICT,
    PAPER_L1,
    TOY_DEAD_WINDOW,
)
from unsuperpose.train import Callback, SAETrainConfig
from unsuperpose.train.grid import JUMPRELU_OPTIONS, grid_kept


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toy",
        help="train SAE grids on toy data with known ground truth",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=storage.location,
        default=Path("runs/toy"),
        help="output folder, or s3://bucket/prefix (the run works in a local mirror "
        "copied up after every checkpoint and at the end)",
    )
    p.add_argument(
        "--grid",
        choices=["default", "paper"],
        default="default",
        help=f"'default': L1 {DEFAULT_L1} (sum convention) x {DEFAULT_DICT} for "
        f"{DEFAULT_STEPS} steps; 'paper': the report's 17 L1 values (per-latent) x "
        f"{PAPER_DICT} for 20,000 steps (a GPU job)",
    )
    p.add_argument("--eval-every", type=int, default=250, help="steps between MMCS evaluations")
    p.add_argument(
        "--data-rng",
        choices=["device", "cpu"],
        default="device",
        help="where toy batches are drawn: on the training device (a GPU's generator "
        "gives other batches than the CPU's, and the run records it), or on the CPU and "
        "copied over (a GPU run on exactly the CPU run's data, slower)",
    )
    add_arguments(p, ToyConfig)
    # One --seed (the toy data's) also seeds the SAE inits and the batch stream.
    add_sae_arguments(
        p,
        dict_flag="--dict-sizes",
        dict_help=f"dictionary sizes as ratios of G (1/8x..32x; a bare number is a "
        f"ratio too: 1 means 1x); default {DEFAULT_DICT}",
        defaults=default_config(),
        knob_defaults=knob_defaults(),
        skip=("seed", "data_seed"),
    )
    for action in p._actions:
        if action.dest == "dead_window":
            action.help = (
                "a latent is dead if it has not fired in this many minibatches (default: "
                "derived from the data, long enough that a latent which learnt the rarest "
                "feature is not counted dead by chance: "
                f"{TOY_DEAD_WINDOW} for the default data and batch)"
            )
    add_run_arguments(p)
    alias(p, "--dict-ratios", "--dict-sizes")  # sizes are --dict-sizes in train and toy
    rename(p, "--G", "--g")  # flags are lower-case
    p.set_defaults(func=run)


def default_config(grid: str = "default") -> SAETrainConfig:
    """The SAE settings of a toy grid before any flag (what --help shows for the default grid)."""
    if grid == "paper":
        return SAETrainConfig(steps=20_000, l1_norm="per_latent", dead_window=TOY_DEAD_WINDOW)
    return SAETrainConfig(
        steps=DEFAULT_STEPS,
        dead_window=TOY_DEAD_WINDOW,
        jumprelu=JUMPRELU_OPTIONS,
    )


def knob_defaults(grid: str = "default") -> dict[str, list]:
    """The grid's knob values by knob name, before any flag (the paper grid sweeps only L1;
    the other knobs take their architecture's defaults there)."""
    if grid == "paper":
        return {"l1": PAPER_L1}
    return {"l1": DEFAULT_L1, "k": DEFAULT_TOPK, "l0_coef": DEFAULT_L0_COEF}


DIAGNOSIS_FILE = "diagnosis.json"


def write_diagnosis(out: Path, G: int) -> dict:
    """diagnosis.json of a toy run folder (local: the S3 mirror's copy before it is pushed)."""
    record = toy_record(out, G)
    write_json_atomic(Path(out) / DIAGNOSIS_FILE, record)
    return record


def kept(args: argparse.Namespace) -> str:
    """What the run folder keeps across an I/O fault (the CLI's one-line error says it)."""
    return grid_kept(args.out)


def run(args: argparse.Namespace) -> int:
    with locked_run(args.out, args.device):  # one writer per run folder (unsuperpose.locking)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        toy = from_args(ToyConfig, args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    base = default_config(args.grid)
    default_dict = PAPER_DICT if args.grid == "paper" else DEFAULT_DICT
    base = dataclasses.replace(base, seed=toy.seed, data_seed=toy.seed)
    # the data's own dead window, unless --dead-window says otherwise
    with stage_errors(ValueError, flags_of(ToyConfig)):  # data its settings cannot make
        window = ToySource(toy).dead_window(getattr(args, "batch_size", base.batch_size))
    base = dataclasses.replace(base, dead_window=window)
    cfg, labels = sae_config(
        args,
        base=base,
        dict_base=toy.G,
        knob_defaults=knob_defaults(args.grid),
        default_dict=default_dict,
        bare="ratio",
    )
    if args.eval_every < 1:
        raise UserError("--eval-every must be >= 1")
    check_run_folder(args.out)
    placement = distributed.setup(args.device)
    source = ToySource(
        toy,
        device=placement.device,
        rng_device="cpu" if args.data_rng == "cpu" else placement.device,
    )
    forest = source.forest
    parts = [
        f"Zipfian frequencies {toy.p_max:g}..{toy.p_min:g} (exponent {toy.zipf_exponent:g})"
        if toy.frequencies == "zipf"
        else f"k={toy.k}"
    ]
    if forest is not None:
        parts.append(
            f"{int((forest.depth >= 0).sum())} features in {int((forest.depth == 0).sum())} trees"
        )
    if toy.correlation_structure == "lowrank":
        parts.append(f"low-rank correlation (rank {toy.lowrank_rank}, scale {toy.lowrank_scale:g})")
    if toy.frequencies == "zipf" or forest is not None:  # k no longer says how many are active
        parts.append(f"{float(source.probs.sum()):.1f} active on average")
    print(
        f"toy data: h={toy.h}, G={toy.G}, {', '.join(parts)}; {grid_size_text(cfg)}, "
        f"{cfg.steps} steps of {cfg.batch_size}"
    )
    diagnosis: dict = {}

    def diagnose_saved(state, out) -> None:  # rank 0, once the grid is saved, before any upload
        try:
            diagnosis.update(write_diagnosis(out, toy.G))
        except Exception as exc:  # the dictionaries are saved: an analysis fault must not undo that
            print(f"warning: the count signals could not be read ({exc}); the run is kept")

    rows = train_grid(
        source,
        cfg,
        args.out,
        size_labels=labels,
        size_base=toy.G,
        size_axis="dictionary size (x G ground-truth features)",
        ground_truth=source.features,
        callbacks=[Callback(args.eval_every, ground_truth_callback(source.features))],
        wandb_mode=args.wandb,
        progress=not args.no_progress,
        run_name=f"toy-{args.out.name}",
        source_info=source.describe(),
        checkpoint_every=args.checkpoint_every,
        force=args.force,
        placement=placement,
        parallel_mode=args.parallel,
        export=diagnose_saved,
    )
    if not distributed.is_main():
        return 0
    best = max(rows, key=lambda r: r["mmcs"])
    best_text = (
        f"best MMCS with the ground truth: {best['mmcs']:.4f} ({knob_text(best)}, dictionary "
        f"{best['dict_label']}); MCC {best['mcc']:.4f}"
    )
    if cfg.fitted:
        # The report's diagnostics read what training leaves (dead latents, the loss surface
        # over an L1 sweep); a fitted basis has neither.
        print(f"{cfg.arch} is a fitted baseline: the report's diagnostics are not read for it")
        print(best_text)
        print(f"wrote {args.out}/summary.csv, figures/, saes/")
        return 0
    if not diagnosis:  # a finished run, not retrained: its folder (on S3: the record it kept)
        if storage.is_remote(args.out):
            if storage.exists(args.out / DIAGNOSIS_FILE):
                diagnosis.update(read_record(storage.read_json(args.out / DIAGNOSIS_FILE)))
        else:
            diagnosis.update(write_diagnosis(args.out, toy.G))
    rule = diagnosis.get("window_rule") or {}
    if rule.get("window"):
        print(
            f"dead window {rule['window']:,} batches by the rule (the training window, the "
            f"truth's unless --dead-window set it: {rule['truth_window']:,}); "
            f"{rule['steps']:,} steps trained, {rule['steps_needed']:,} needed"
        )
    for p in diagnosis.get("pointers", []):
        where = (
            p["why"]
            if not p.get("reading", True)
            else "nowhere in the grid"
            if p["size"] is None
            else (
                f"more than {p['size']:,} latents"
                if p["lower_bound"]
                else f"{p['size']:,} latents ({p['ratio']:g}x of G)"
            )
        )
        off = p.get("size_steps_off")
        print(
            f"{p['diagnostic']}{' (default)' if p.get('default') else ''}: {where}"
            + ("" if off is None else f", {off} size step(s) from the truth")
        )
    print(best_text)
    print(f"wrote {args.out}/summary.csv, {DIAGNOSIS_FILE}, figures/, saes/")
    return 0
