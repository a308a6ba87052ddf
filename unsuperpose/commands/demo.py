"""`unsuperpose demo`: the pipeline on the embedded defaults, as one command."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unsuperpose.cli import main as cli_main
from unsuperpose.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded defaults",
                       description=__doc__)
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where every stage writes")
    p.add_argument("--quick", action="store_true", help="a few minutes instead of the full defaults")
    p.set_defaults(func=run)


def _step(name: str, argv: list[str], timings: list) -> None:
    print(f"\n=== {name}: unsuperpose {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        raise UserError(f"demo step '{name}' failed (exit {code}); fix it, then rerun `make demo`")
    timings.append((name, time.perf_counter() - t))


def run(args: argparse.Namespace) -> int:
    timings: list[tuple[str, float]] = []
    toy = ["toy", "--out", str(args.runs / "toy")]
    if args.quick:
        toy += ["--steps", "1000", "--dict-ratios", "1/2x,1x,2x"]
    _step("toy replication", toy, timings)
    print("\n=== demo finished")
    for name, secs in timings:
        print(f"  {name:<20} {secs / 60:5.1f} min")
    print(f"results: {args.runs / 'toy' / 'summary.csv'} and {args.runs / 'toy' / 'figures'}/")
    return 0
