"""`unsuperpose demo`: the whole pipeline on the embedded defaults, as one command.

tiny LM -> harvest layer 1 -> SAE grid on the store -> toy replication -> report (+ feature
browser). Each step is the ordinary subcommand, so its output is exactly what that command
writes. A step whose output is already complete is skipped, and the subcommands themselves resume
from their checkpoints, so after an interruption the same command carries on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from unsuperpose.cli import main as cli_main
from unsuperpose.errors import UserError

LM, LAYER = "tiny", 1
CHECKPOINT_DIR = "checkpoint"  # what `train`/`toy` leave while a grid is unfinished

# The demo uses the same budgets as `make lm` (the tiny preset: 2.5M tokens) and `make toy` (its
# default grid, 5,000 steps), so its outputs are the ones those targets would make. Store: 2^19
# tokens of layer 1. SAEs: 1x..8x of d = 64 at four L1 values a half decade apart (on this layer,
# L1 1e-4 left ~40-80 latents active per token, 3e-3 about 7), 5,000 steps of 256. Measured on
# the 2-core machine: about 15 minutes in all (README).
FULL = dict(lm_tokens=2_500_000, store_tokens=524_288, dict="1x,2x,4x,8x", l1="3e-4,1e-3,3e-3,1e-2",
            sae_steps=5000, toy=[])
# --quick: a smoke run of a few minutes; the numbers mean little.
QUICK = dict(lm_tokens=65_536, store_tokens=131_072, dict="1x,2x,4x", l1="3e-4,1e-3,3e-3",
             sae_steps=400, toy=["--h", "64", "--G", "128", "--steps", "500", "--dict-ratios", "1/2x,1x,2x"])


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Callable[[], bool]
    output: Path


def _store_complete(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.exists():
        return False
    return bool(json.loads(meta.read_text()).get("attributes", {}).get("complete"))


def _grid_complete(path: Path) -> bool:
    return (path / "summary.csv").exists() and not (path / CHECKPOINT_DIR).exists()


def plan(runs: Path, quick: bool = False, progress: bool = True) -> list[Step]:
    """The demo's steps, in order, each with its command line and its completeness check."""
    s = QUICK if quick else FULL
    lm_dir = runs / "lm" / LM
    acts = runs / "acts" / LM
    store = acts / f"layer{LAYER}.zarr"
    sae_out = runs / "sae" / LM / f"layer{LAYER}"
    grid = sae_out / s["dict"].replace(",", "+")
    toy = runs / "toy"
    quiet = [] if progress else ["--no-progress"]
    return [
        Step("tiny LM", ["lm", "train", "--preset", LM, "--out", str(lm_dir), "--tokens", str(s["lm_tokens"]),
                         *quiet], lambda: (lm_dir / "model.safetensors").exists(), lm_dir),
        Step(f"harvest layer {LAYER}", ["harvest", "--lm", str(lm_dir), "--layer", str(LAYER), "--out", str(acts),
                                        "--tokens", str(s["store_tokens"]), *quiet],
             lambda: _store_complete(store), store),
        Step("SAE grid", ["train", "--store", str(store), "--dict", s["dict"], "--out", str(sae_out),
                          "--l1", s["l1"], "--steps", str(s["sae_steps"]), *quiet],
             lambda: _grid_complete(grid), grid),
        Step("toy replication", ["toy", "--out", str(toy), *s["toy"], *quiet], lambda: _grid_complete(toy), toy),
        # Always rebuilt: it is cheap, and it must reflect whatever the steps above left.
        Step("report", ["analyze", "report", "--runs", str(runs), "--lm", LM, "--layer", str(LAYER), *quiet],
             lambda: False, runs / "report" / f"{LM}-layer{LAYER}" / "index.html"),
    ]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded defaults",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where every stage writes")
    p.add_argument("--quick", action="store_true", help="a few minutes instead of ~20 (numbers mean little)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _cpu_seconds() -> float:
    # Every step runs in this process: its CPU time says what the step costs, also on a shared
    # machine where the wall clock mostly measures the neighbours.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(args: argparse.Namespace) -> int:
    steps = plan(args.runs, args.quick, progress=not args.no_progress)
    timings: list[tuple[str, float | None, float | None]] = []
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    for step in steps:
        if step.done():
            print(f"\n=== {step.name}: {step.output} is complete; skipped", flush=True)
            timings.append((step.name, None, None))
            continue
        print(f"\n=== {step.name}: unsuperpose {' '.join(step.argv)}", flush=True)
        t, cpu = time.perf_counter(), _cpu_seconds()
        code = cli_main(step.argv)
        if code != 0:
            raise UserError(f"demo step '{step.name}' failed (exit {code}); fix what it says, then "
                            "rerun the same command: finished steps are skipped")
        timings.append((step.name, time.perf_counter() - t, _cpu_seconds() - cpu))
    timings.append(("total", time.perf_counter() - start, _cpu_seconds() - cpu0))
    print("\n=== demo finished\n\n  step                  wall      CPU")
    for name, secs, cpu in timings:
        shown = "  skipped" if secs is None else f"{secs / 60:5.1f} min {cpu / 60:5.1f} min"
        print(f"  {name:<20} {shown}")
    print()
    print(f"report: {steps[-1].output.resolve()}")
    return 0
