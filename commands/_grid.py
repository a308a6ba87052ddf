"""What `unsuperpose toy` and `unsuperpose train` share: the SAE flags, the grid's config from
them, and the call of ``train.run_grid`` with the analysis it scores and draws with."""

from __future__ import annotations

import argparse
import dataclasses

from unsuperpose import distributed
from unsuperpose.analyze import grid_figures, score_grid
from unsuperpose.commands.errors import stage_errors
from unsuperpose.config import add_arguments, replace_from_args
from unsuperpose.errors import UserError
from unsuperpose.train import (
    FAMILIES,
    PRESETS,
    SAETrainConfig,
    apply_preset,
    get_family,
    parallel,
    parse_dict_sizes,
)
from unsuperpose.train.grid import GridError, convert_l1, run_grid
from unsuperpose.train.registry import DEFAULT_ARCH, knobs

# Parsed from the knobs' flags (--l1, --topk, ...: the registered families') and --dict, so that
# ratios and lists get clear errors and a knob given to the wrong architecture is refused.
SKIP = ("sparsity", "dict_sizes")


def add_sae_arguments(
    parser: argparse.ArgumentParser,
    *,
    dict_flag: str,
    dict_help: str,
    defaults: SAETrainConfig,
    knob_defaults: dict[str, list],
    skip: tuple[str, ...] = (),
) -> None:
    """The SAE flags; ``--help`` shows ``defaults`` and ``knob_defaults`` (by knob name), the
    command's own (not the dataclass's). One flag per registered knob: architectures sharing a
    knob share its flag."""
    for flag, knob in knobs().items():
        archs = [f.name for f in FAMILIES.values() if f.knob.flag == flag]
        shown = ",".join(knob.text(v) for v in knob_defaults.get(knob.name, knob.defaults))
        parser.add_argument(
            flag,
            dest=knob_dest(knob),
            metavar=knob.name.upper(),
            type=str,
            default=argparse.SUPPRESS,
            help=f"{knob.help}: the knob of --arch {', '.join(archs)} (default: {shown})",
        )
    parser.add_argument(dict_flag, dest="dict", type=str, default=argparse.SUPPRESS, help=dict_help)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="'report': the 2022 report's settings (Adam 1e-3, batch 256, per-latent "
        "L1, nn.Linear-style encoder init); flags given explicitly still win",
    )
    parser.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="W&B mode (default: $WANDB_MODE, else offline; online needs `wandb login`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(parser, SAETrainConfig, skip=SKIP + skip, defaults=defaults)


def knob_dest(knob) -> str:
    """Where argparse keeps a knob flag's text: --l0-coef -> knob_l0_coef."""
    return "knob_" + knob.flag.lstrip("-").replace("-", "_")


def sae_config(
    args: argparse.Namespace,
    *,
    base: SAETrainConfig,
    dict_base: int,
    knob_defaults: dict[str, list],
    default_dict: str,
    bare: str = "absolute",
) -> tuple[SAETrainConfig, dict[int, str]]:
    """Defaults < preset < explicit flags; returns the config and each size's label.

    The knob's values: its flag, else the family's own defaults where it has them (another
    scale than the command's), else the command's ``knob_defaults`` for the knob's name, else
    the knob's. Default L1 values are in ``base.l1_norm``'s convention; when a preset or flag
    switches the convention and no --l1 is given, they are converted (at 1x of ``dict_base``)
    and the run says so, rather than reading sum-convention values as per-latent ones.
    """
    try:
        sizes = parse_dict_sizes(getattr(args, "dict", None) or default_dict, dict_base, bare=bare)
        arch = getattr(args, "arch", base.arch)
        family = get_family(arch)
        knob = family.knob
        refuse_other_knobs(args, arch)
        # the base's values are its own architecture's knob: this one's come below
        base = dataclasses.replace(base, arch=arch, sparsity=None)
        cfg = replace_from_args(apply_preset(base, args.preset), args, skip=SKIP)
        given = getattr(args, knob_dest(knob), None)
        if given:
            values = knob.parse(given)
        elif family.default_values is not None:
            values = list(family.default_values)  # its scale is not the command's
        else:
            values = list(knob_defaults.get(knob.name, knob.defaults))
            if knob.all_value is not None:  # a basis's default sweep: and every coefficient
                values.append(knob.all_value)
            if "l1_norm" in family.settings and cfg.l1_norm != base.l1_norm:
                values = convert_l1(values, have=base.l1_norm, want=cfg.l1_norm, base=dict_base)
                print(
                    f"L1 convention {cfg.l1_norm}: default L1 values converted from the "
                    f"{base.l1_norm} convention at {dict_base} latents: {values}"
                )
        cfg = dataclasses.replace(cfg, sparsity=values, dict_sizes=[n for _, n in sizes])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return cfg, {n: label for label, n in sizes}


def grid_size_text(cfg: SAETrainConfig) -> str:
    """e.g. '4 L1 x 3 sizes = 12 relu SAEs' or '3 k x 2 sizes = 6 topk SAEs'."""
    knob = cfg.family.knob.label
    n_knob, n_size = len(cfg.sparsity), len(cfg.dict_sizes)
    return f"{n_knob} {knob} x {n_size} sizes = {n_knob * n_size} {cfg.arch} SAEs"


def knob_text(row: dict) -> str:
    """A summary row's knob as messages write it: 'L1 0.001' or 'topk k 8' (the default
    architecture, the report's relu, goes without its name, as it always has)."""
    arch = row.get("arch", DEFAULT_ARCH)
    knob = get_family(arch).knob
    value = knob.text(row.get("sparsity", row.get("l1")))
    return f"{knob.label} {value}" if arch == DEFAULT_ARCH else f"{arch} {knob.label} {value}"


def refuse_other_knobs(args: argparse.Namespace, arch: str) -> None:
    """A knob flag of another architecture than ``arch`` is refused rather than silently
    ignored."""
    mine = get_family(arch).knob
    for flag, knob in knobs().items():
        if flag != mine.flag and getattr(args, knob_dest(knob), None):
            takes = "; ".join(
                f"{fl}: {', '.join(a for a, f in FAMILIES.items() if f.knob.flag == fl)}"
                for fl in knobs()
            )
            raise ValueError(
                f"{flag} is not a knob of --arch {arch}; its knob is {mine.flag} ({takes})"
            )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=distributed.DEVICE_HELP)
    parser.add_argument(
        "--parallel",
        choices=parallel.MODES,
        default="grid",
        help="under torchrun: 'grid' deals the dictionary sizes out to the processes "
        "(bit-identical to one process), 'data' gives every process a slice of each "
        "batch and averages gradients (one grid too big for one device)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="steps between checkpoints (also saved on Ctrl-C/SIGTERM); 0: only then",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over even if the output folder holds a run with other settings",
    )


def train_grid(source, cfg: SAETrainConfig, out, **kw) -> list[dict]:
    """``train.run_grid`` as the commands run it: scored and drawn by ``analyze``, its errors
    the command's (``--parallel`` for the sharding's ``mode``)."""
    with (
        stage_errors(parallel.ShardingError, {"mode": "--parallel"}),
        stage_errors(GridError, {"force": "--force"}),
    ):
        return run_grid(source, cfg, out, score=score_grid, figures=grid_figures, **kw)
