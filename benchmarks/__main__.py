"""Run every ``benchmarks/bench_*.py`` (or those named on the command line) and print JSON lines.

Each module has ``run() -> list[dict]``. Figures that are compared (ours vs a baseline, store vs
RAM) are measured within one run as ratios, because this machine is shared and absolute speeds
move by 3-4x with load. The machine's load average is printed with every figure.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    for name in names:
        mod = importlib.import_module(
            f"benchmarks.{name if name.startswith('bench_') else 'bench_' + name}"
        )
        t0 = time.perf_counter()
        for record in mod.run():
            record = {
                "bench": mod.__name__.split(".")[-1],
                **record,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(record), flush=True)
        print(json.dumps({"bench": name, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
