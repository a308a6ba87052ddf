"""The follow-up update's experiment: the wall time of `make replicate-update`
(tiny LM, layer-3 store, 1x..32x grid, `make toy`'s grid, report) from an empty runs folder, and
where the diagnostics point on the LM and on the toy grid. About 30 minutes on 2 cores.

Set UNSUPERPOSE_BENCH_RUNS to a runs folder that already holds the tiny LM to skip training it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from unsuperpose.cli import main


def _pointers(record: dict) -> list[str]:
    return [
        f"{p['diagnostic'].split(' ')[0]}:"
        + (
            "none"
            if p["size"] is None
            else (f">{p['size']}" if p["lower_bound"] else str(p["size"]))
        )
        for p in record["pointers"]
    ]


def run() -> list[dict]:
    runs = Path(
        os.environ.get("UNSUPERPOSE_BENCH_RUNS") or tempfile.mkdtemp(prefix="bench-update-")
    )
    t = time.perf_counter()
    code = main(["demo", "--update", "--runs", str(runs), "--no-progress"])
    wall = time.perf_counter() - t
    rec = json.loads((runs / "report" / "tiny-layer3" / "diagnosis.json").read_text())
    lm, toy = rec["lm"], rec["toy"]
    return [
        {
            "figure": "replicate_update",
            "exit": code,
            "wall_s": round(wall, 1),
            "runs": str(runs),
            "lm_pointers_latents": _pointers(lm),
            "lm_estimate": lm.get("estimate"),
            "toy_pointers_latents": _pointers(toy) if toy else None,
            "toy_size_steps_off": [p.get("size_steps_off") for p in toy["pointers"]]
            if toy
            else None,
        }
    ]
