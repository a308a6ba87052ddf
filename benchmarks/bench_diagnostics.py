"""Does the count depend on how the grid was drawn, or on the toy data?

For two seeds no test uses, `make toy`'s default grid (h 256, G 512, 5 L1 x 1/4x..4x, batch 256)
is trained on four kinds of toy data:
- independent features (correlation 0);
- the report's correlation recipe (Bernoulli with 2 p_i Phi(z_i), groups of 8 at rho 0.5);
- our threshold copula at rho 0.25 and at rho 0.5 (the default data), the latter with one more L1
  column below the grid (1e-5): the diagnostics are read with and without it.

Each grid is read at 5,000 steps (`make toy` stops there), the default data's also at 2,000.
Printed per read:
- ``toy_diagnostics``: where each diagnostic points (ratio of G; ">" marks a lower bound) under
  the default reading, and the best MMCS with the truth;
- ``dead_sensitivity``: the dead-neuron pointer for each tolerance (0, 0.5%, 1%) and dead window
  (100, 200, the derived 183, 400, 1,000 batches), in grid steps from the truth;
- ``grid_extension``: the default data's pointers with and without the 1e-5 column;
- ``coupling``: how much more often a feature fires when a partner of its group fires (lift).

- ``grid_rows``: every cell's held-out losses, L0, dead counts (at every window) and MMCS, so
  that any reading can be recomputed from the printed record (``rows_diagnosis(rows, G, window)``).

`STUDY_SEEDS=101 python -m benchmarks bench_diagnostics` runs one seed (two such processes with
OMP_NUM_THREADS=1 share the 2 cores well), `STUDY_DATA=independent,...` some of the data.
About 65 minutes for both seeds on a quiet 2-core machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

from benchmarks.common import pointer_where as _where
from unsuperpose.analyze import score_grid
from unsuperpose.analyze.report import rows_diagnosis
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.toy.defaults import DEFAULT_DICT, DEFAULT_L1
from unsuperpose.train import SAETrainConfig, evaluate, new_state, parse_dict_sizes, train_steps

SEEDS = (101, 202)  # tests use seeds below 20
READ_AT = (2000, 5000)
EXTRA_L1 = 1e-5  # the acceptance's column below the default grid
DATA = {
    "threshold copula, rho 0.5 (default)": dict(correlation=0.5),
    "report recipe, rho 0.5": dict(correlation=0.5, correlation_recipe="report"),
    "independent": dict(correlation=0.0),
    "threshold copula, rho 0.25": dict(correlation=0.25),
}
DEFAULT_DATA = "threshold copula, rho 0.5 (default)"
ROW_KEYS = (
    "l1",
    "dict_size",
    "heldout_mse",
    "heldout_l1_loss",
    "heldout_l0",
    "heldout_fvu",
    "dead",
    "mmcs",
    "mcc",
    "mmcs_larger",
)


def _pointers(record: dict) -> dict[str, str]:
    return {p["diagnostic"].split(" ")[0]: _where(p) for p in record["pointers"]}


def _steps_off(size, lower_bound: bool, sizes: list[int], truth: int) -> int | None:
    if size is None or lower_bound:
        return None
    return abs(sizes.index(size) - sizes.index(truth))


def coupling(src: ToySource, n: int = 100_000) -> float:
    """Mean lift P(j on | i on) / P(j on) over pairs of common features in one group."""
    on = torch.cat([src.sample(10_000, seed=i)[1] for i in range(n // 10_000)]) > 0
    on = on.float()
    p = on.mean(0)
    joint = (on.T @ on) / on.shape[0]
    lift = joint / (p[:, None] * p[None, :]).clamp_min(1e-12)
    g = src.groups
    pairs = (
        (p > 0.01)[:, None]
        & (p > 0.01)[None, :]
        & (g[:, None] == g[None, :])
        & ~torch.eye(len(p), dtype=torch.bool)
    )
    return float(lift[pairs].mean())


def study(seed: int, name: str, settings: dict) -> Iterator[dict]:
    """The grid on one kind of data, read at each of READ_AT; records as they come (an hour's
    run prints as it goes)."""
    src = ToySource(ToyConfig(seed=seed, **settings))
    G = src.config.G
    sizes = [n for _, n in parse_dict_sizes(DEFAULT_DICT, G, bare="ratio")]
    l1s = ([EXTRA_L1] if name == DEFAULT_DATA else []) + DEFAULT_L1
    window = src.dead_window(256)
    cfg = SAETrainConfig(
        sparsity=l1s,
        dict_sizes=sizes,
        steps=READ_AT[-1],
        dead_window=window,
        seed=seed,
        data_seed=seed,
        log_every=1000,
    )
    state = new_state(src, cfg)
    yield {
        "figure": "coupling",
        "seed": seed,
        "data": name,
        "lift_within_group": round(coupling(src), 3),
    }
    t0 = time.perf_counter()
    for step in READ_AT if name == DEFAULT_DATA else READ_AT[-1:]:
        train_steps(state, src, until=step, progress=False)
        metrics = evaluate(state, src)
        scores = score_grid(state.dictionaries(), metrics, src.features)
        rows = [
            {"l1": a, "dict_size": n, **metrics[(a, n)], **scores[(a, n)]} for (a, n) in metrics
        ]
        yield {
            "figure": "grid_rows",
            "seed": seed,
            "data": name,
            "step": step,
            "window": window,
            "rows": [
                {
                    k: (float(f"{v:.7g}") if isinstance(v, float) else v)
                    for k, v in r.items()
                    if k in ROW_KEYS or k.startswith("dead_w")
                }
                for r in rows
            ],
        }
        default_rows = [r for r in rows if r["l1"] in DEFAULT_L1]
        # the grid-wide SSLL of the default grid alone, as `make toy` would have it
        rec = rows_diagnosis(_rescored(default_rows), G, window)
        at_1x = max(r["mmcs"] for r in default_rows if r["dict_size"] == G)
        yield (
            {
                "figure": "toy_diagnostics",
                "seed": seed,
                "data": name,
                "step": step,
                "pointers": _pointers(rec),
                "size_steps_off": [p.get("size_steps_off") for p in rec["pointers"]],
                "literal_dead_rule": _where(_ratio(rec["dead_reading"]["literal_rule"], G)),
                "best_mmcs": round(rec["optimum"]["mmcs"], 4),
                "best_at": f"L1 {rec['optimum']['knob']:g}, {rec['optimum']['ratio']:g}x",
                "best_mmcs_1x": round(at_1x, 4),
                "heldout_rows": rows[0]["heldout_rows"],
                "window": window,
                "train_wall_s": round(time.perf_counter() - t0, 1),
            }
        )
        for r in rec["dead_sensitivity"]:
            if r["window"] not in (100, 200, 400, 1000, window):
                continue
            yield (
                {
                    "figure": "dead_sensitivity",
                    "seed": seed,
                    "data": name,
                    "step": step,
                    "window": r["window"],
                    "tolerance": r["tolerance"],
                    "points_to": _where(_ratio(r, G)),
                    "size_steps_off": _steps_off(r["size"], r["lower_bound"], sizes, G),
                }
            )
        if name == DEFAULT_DATA:
            wider = rows_diagnosis(_rescored(rows), G, window)
            yield (
                {
                    "figure": "grid_extension",
                    "seed": seed,
                    "step": step,
                    "without_1e-5": _pointers(rec),
                    "with_1e-5": _pointers(wider),
                    "with_size_steps_off": [p.get("size_steps_off") for p in wider["pointers"]],
                    "all_within_one_step_no_bound": all(
                        p.get("size_steps_off") is not None and p["size_steps_off"] <= 1
                        for p in wider["pointers"]
                    ),
                }
            )


def _ratio(row: dict | None, G: int) -> dict | None:
    return None if row is None else {**row, "ratio": row["size"] / G if row["size"] else None}


def _rescored(rows: list[dict]) -> list[dict]:
    """SSLL and MMCS with larger dictionaries are grid-relative: recompute them over ``rows``."""
    from unsuperpose.analyze.metrics import ssll

    stick = ssll(
        {(r["l1"], r["dict_size"]): r["heldout_mse"] for r in rows},
        {(r["l1"], r["dict_size"]): r["heldout_l1_loss"] for r in rows},
    )
    return [{**r, "ssll": stick[(r["l1"], r["dict_size"])]} for r in rows]


def run() -> Iterator[dict]:
    seeds = [int(s) for s in os.environ.get("STUDY_SEEDS", "").split(",") if s] or SEEDS
    wanted = [d for d in os.environ.get("STUDY_DATA", "").split(";") if d] or list(DATA)
    for seed in seeds:
        for name in wanted:
            yield from study(seed, name, DATA[name])
