"""`unsuperpose demo`: the whole pipeline on the embedded defaults, as one command.

tiny LM -> harvest layer 1 -> SAE grid on the store (grown, one larger dictionary at a time,
until the largest dictionary loses latents at every L1 (the default dead-neuron reading) or the
demo's largest size is reached) -> toy replication
-> report (+ feature browser). Each step is the ordinary subcommand, so its output is exactly
what that command writes. A step whose output is already complete is skipped, and the
subcommands themselves resume from their checkpoints (and refuse outputs made with other
settings, data or budget), so after an interruption the same command carries on where it
stopped. ``--quick`` writes to its own folder, so its outputs are never taken for the full demo's.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from unsuperpose.analyze.diagnostics import DEFAULT_TOLERANCE, dead_boundary
from unsuperpose.cli import main as cli_main
from unsuperpose.errors import UserError
from unsuperpose.train.io import read_summary
from unsuperpose.train.layout import CHECKPOINT_DIR, SUMMARY_FILE

LM, LAYER = "tiny", 1

# The demo uses the same budgets as `make lm` (the tiny preset: 2.5M tokens) and `make toy` (its
# default grid, 5,000 steps), so its outputs are the ones those targets would make. Store: 2^19
# tokens of layer 1. SAEs: 1x..8x of d = 64 at four L1 values a half decade apart (on this layer,
# L1 1e-4 left ~40-80 latents active per token, 3e-3 about 7), 5,000 steps of 256. Measured on
# the 2-core machine: about 11 minutes in all (README).
FULL = dict(
    lm_tokens=2_500_000,
    layer=LAYER,
    store_tokens=524_288,
    dict="1x,2x,4x,8x",
    l1="3e-4,1e-3,3e-3,1e-2",
    sae_steps=5000,
    grow=["16x", "32x"],
    splice_tokens=8192,
    # `make toy`'s grid at its three middle L1 values (1/4x..4x, 5,000 steps): the whole
    # grid would take the demo past 20 minutes; this still brackets the truth (README).
    toy=["--l1", "0.0001,0.00031623,0.001"],
    toy_dir="toy-demo",
)
# --quick: a smoke run of a few minutes; the numbers mean little. Its own runs folder.
QUICK = dict(
    lm_tokens=65_536,
    layer=LAYER,
    store_tokens=131_072,
    dict="1x,2x,4x",
    l1="3e-4,1e-3,3e-3",
    sae_steps=400,
    grow=["8x"],
    splice_tokens=1024,
    toy=["--h", "64", "--G", "128", "--steps", "500", "--dict-ratios", "1/4x,1/2x,1x,2x,4x"],
    toy_dir="toy-demo",
)
QUICK_RUNS = Path("runs/quick")
# --update: the follow-up update's experiment (`make replicate-update`): the same tiny LM, its
# layer-3 MLP (64 wide) over the whole corpus, dictionaries 1x..32x (64..2,048 latents) at four
# L1 values, 10,000 steps; `make toy`'s full grid beside it. About 30 minutes (README).
UPDATE = dict(
    lm_tokens=2_500_000,
    layer=3,
    store_tokens=None,
    dict="1x,2x,4x,8x,16x,32x",
    l1="3.1623e-4,1e-3,3.1623e-3,1e-2",
    sae_steps=10_000,
    grow=[],
    toy=[],
    toy_dir="toy",
    splice_tokens=16_384,
)


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Callable[[], bool]
    output: Path
    grow: bool = False  # a larger dictionary, run only while some L1 keeps every latent alive


def _store_complete(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.exists():
        return False
    return bool(json.loads(meta.read_text()).get("attributes", {}).get("complete"))


def _grid_complete(path: Path) -> bool:
    return (path / SUMMARY_FILE).exists() and not (path / CHECKPOINT_DIR).exists()


def _lm_done(lm_dir: Path, tokens: int) -> bool:
    """A model trained on this demo's budget is done; one trained on another is refused (it
    would be passed off as this demo's: e.g. the --quick LM in the full demo's folder)."""
    if not (lm_dir / "model.safetensors").exists():
        return False
    cfg_path = lm_dir / "lm_config.json"
    meta = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    have = ((meta.get("extra") or {}).get("train") or {}).get("tokens")
    if have is not None and int(have) != tokens:
        raise UserError(
            f"{lm_dir} holds an LM trained on {int(have):,} tokens, not the {tokens:,} of "
            "this demo; use another --runs, or delete that folder to train it again"
        )
    return True


def _finished_rows(sae_out: Path) -> list[dict]:
    rows = []
    for summary in sorted(sae_out.glob("*/summary.csv")):
        if not (summary.parent / CHECKPOINT_DIR).exists():
            rows += [r for r in read_summary(summary) if "dead" in r and "dict_size" in r]
    return rows


def trained_sizes(sae_out: Path) -> list[int]:
    return sorted({int(r["dict_size"]) for r in _finished_rows(sae_out)})


def _passes() -> str:
    return (
        "has no dead latent"
        if DEFAULT_TOLERANCE == 0
        else f"keeps at least {1 - DEFAULT_TOLERANCE:.1%} of its latents"
    )


def _fails() -> str:
    return (
        "has dead latents"
        if DEFAULT_TOLERANCE == 0
        else f"loses more than {DEFAULT_TOLERANCE:.1%} of its latents"
    )


def alive_at_largest(sae_out: Path) -> list[float]:
    """L1 values at which the largest dictionary trained so far (over every set in ``sae_out``)
    passes the default dead-neuron reading (``analyze.diagnostics.DEFAULT_TOLERANCE``): there
    the evidence is open-ended and the grid must grow."""
    dead = {
        (float(r["l1"]), int(r["dict_size"])): float(r["dead"]) for r in _finished_rows(sae_out)
    }
    db = dead_boundary(dead, DEFAULT_TOLERANCE)
    return sorted(db.all_alive)


def settings(quick: bool = False, update: bool = False) -> dict:
    return UPDATE if update else QUICK if quick else FULL


def plan(
    runs: Path, quick: bool = False, progress: bool = True, update: bool = False
) -> list[Step]:
    """The demo's steps, in order, each with its command line and its completeness check."""
    s = settings(quick, update)
    layer = s["layer"]
    lm_dir = runs / "lm" / LM
    acts = runs / "acts" / LM
    store = acts / f"layer{layer}.zarr"
    sae_out = runs / "sae" / LM / f"layer{layer}"
    # The demo's toy grid is smaller than `make toy`'s (runs/toy), and a folder holds one grid.
    toy = runs / s["toy_dir"]
    quiet = [] if progress else ["--no-progress"]
    tokens = ["--tokens", str(s["store_tokens"])] if s["store_tokens"] else []

    def train_step(name: str, spec: str, grow: bool = False) -> Step:
        folder = sae_out / spec.replace(",", "+")
        return Step(
            name,
            [
                "train",
                "--store",
                str(store),
                "--dict",
                spec,
                "--out",
                str(sae_out),
                "--l1",
                s["l1"],
                "--steps",
                str(s["sae_steps"]),
                "--splice-tokens",
                str(s["splice_tokens"]),
                *quiet,
            ],
            lambda: _grid_complete(folder),
            folder,
            grow=grow,
        )

    return [
        Step(
            "tiny LM",
            [
                "lm",
                "train",
                "--preset",
                LM,
                "--out",
                str(lm_dir),
                "--tokens",
                str(s["lm_tokens"]),
                *quiet,
            ],
            lambda: _lm_done(lm_dir, s["lm_tokens"]),
            lm_dir,
        ),
        Step(
            f"harvest layer {layer}",
            [
                "harvest",
                "--lm",
                str(lm_dir),
                "--layer",
                str(layer),
                "--out",
                str(acts),
                *tokens,
                *quiet,
            ],
            lambda: _store_complete(store),
            store,
        ),
        train_step("SAE grid", s["dict"]),
        *[train_step(f"SAE grid, grown to {size}", size, grow=True) for size in s["grow"]],
        Step(
            "toy replication",
            ["toy", "--out", str(toy), *s["toy"], *quiet],
            lambda: _grid_complete(toy),
            toy,
        ),
        # Always rebuilt: it is cheap, and it must reflect whatever the steps above left.
        Step(
            "report",
            [
                "analyze",
                "report",
                "--runs",
                str(runs),
                "--lm",
                LM,
                "--layer",
                str(layer),
                "--toy",
                str(toy),
                *quiet,
            ],
            lambda: False,
            runs / "report" / f"{LM}-layer{layer}" / "index.html",
        ),
    ]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the embedded defaults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help=f"where every stage writes (default: runs, or {QUICK_RUNS} with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few minutes instead of ~20 (numbers mean little)"
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="the follow-up update's experiment instead: layer 3, dictionaries 1x..32x, "
        "10,000 steps, beside `make toy`'s grid (~30 minutes)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _cpu_seconds() -> float:
    # Every step runs in this process: its CPU time says what the step costs, also on a shared
    # machine where the wall clock mostly measures the neighbours.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(args: argparse.Namespace) -> int:
    if args.quick and args.update:
        raise UserError("--quick and --update are two different runs; choose one")
    runs = args.runs or (QUICK_RUNS if args.quick else Path("runs"))
    steps = plan(runs, args.quick, progress=not args.no_progress, update=args.update)
    sae_out = runs / "sae" / LM / f"layer{settings(args.quick, args.update)['layer']}"
    timings: list[tuple[str, float | None, float | None]] = []
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    for step in steps:
        if step.grow:
            open_l1 = alive_at_largest(sae_out)
            if not open_l1:
                print(
                    f"\n=== {step.name}: not needed, the largest dictionary {_fails()} at every L1",
                    flush=True,
                )
                continue
            print(
                f"\n=== at L1 {', '.join(f'{a:g}' for a in open_l1)} the largest dictionary keeps "
                f"its latents: growing the grid to {step.output.name}",
                flush=True,
            )
        if step.done():
            print(f"\n=== {step.name}: {step.output} is complete; skipped", flush=True)
            timings.append((step.name, None, None))
            continue
        print(f"\n=== {step.name}: unsuperpose {' '.join(step.argv)}", flush=True)
        t, cpu = time.perf_counter(), _cpu_seconds()
        code = cli_main(step.argv)
        if code != 0:
            raise UserError(
                f"demo step '{step.name}' failed (exit {code}); fix what it says, then "
                "rerun the same command: finished steps are skipped"
            )
        timings.append((step.name, time.perf_counter() - t, _cpu_seconds() - cpu))
    open_l1 = alive_at_largest(sae_out)
    if open_l1:
        at = ", ".join(f"{a:g}" for a in open_l1)
        print(
            f"\nSAE grid: the largest dictionary ({max(trained_sizes(sae_out)):,} latents) "
            f"{_passes()} at L1 {at}: the budget ended before its latents died, so the LM "
            "estimate is a lower bound"
        )
    else:
        print(f"\nSAE grid: the largest dictionary {_fails()} at every L1")
    timings.append(("total", time.perf_counter() - start, _cpu_seconds() - cpu0))
    print("\n=== demo finished\n\n  step                  wall      CPU")
    for name, secs, cpu in timings:
        shown = "  skipped" if secs is None else f"{secs / 60:5.1f} min {cpu / 60:5.1f} min"
        print(f"  {name:<20} {shown}")
    print()
    print(f"report: {steps[-1].output.resolve()}")
    return 0
