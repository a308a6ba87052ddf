"""Toy recovery at 1x: best MMCS with the ground truth after 1k / 2k / 5k steps on the report's
setup, with our defaults (no resampling), with resampling every 250 steps, with --preset report
(per-latent L1, lr 1e-3); also without renormalising the decoder after each step, and with
resampling candidates from one batch instead of a pool: what each fix changed.

About 15 minutes on the 2-core machine. (The diagnostics' figures: bench_diagnostics.)
"""

from __future__ import annotations

import dataclasses

from unsuperpose.analyze import mmcs
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.toy.defaults import TOY_DEAD_WINDOW
from unsuperpose.train import Callback, SAETrainConfig, apply_preset, new_state, train_steps
from unsuperpose.train.families.stacked import StackedGroup

SEED = 101  # tests use seeds below 20


def recovery(name: str, l1: list[float], renormalise: bool = True, **overrides) -> list[dict]:
    """Best MMCS at 1x; ``renormalise=False`` reproduces the old trainer (decoder rows normalised
    in the forward pass only) to measure what renormalising after each step changes."""
    if not renormalise:
        original = StackedGroup.post_step
        StackedGroup.post_step = lambda self: None
        try:
            return recovery(name, l1, **overrides)
        finally:
            StackedGroup.post_step = original
    src = ToySource(ToyConfig(seed=SEED))
    preset = overrides.pop("preset", None)
    # make toy's dead window: with the LM default (1,000 batches) almost nothing counts as dead
    # at 1x, and resampling would have nothing to act on.
    cfg = apply_preset(
        SAETrainConfig(
            sparsity=l1,
            dict_sizes=[512],
            steps=5000,
            log_every=1000,
            dead_window=TOY_DEAD_WINDOW,
            seed=SEED,
            data_seed=SEED,
        ),
        preset,
    )
    cfg = dataclasses.replace(cfg, **overrides)

    def cb(step, dicts):
        return {k: {"mmcs": mmcs(src.features, d)} for k, d in dicts.items()}

    state = new_state(src, cfg)
    train_steps(state, src, callbacks=[Callback(1000, cb)], progress=False)
    out = []
    for step in (1000, 2000, 5000):
        best = max((h for h in state.history if h["step"] == step), key=lambda h: h["mmcs"])
        out.append(
            {
                "figure": "toy_recovery_1x",
                "settings": name,
                "seed": SEED,
                "step": step,
                "best_mmcs": round(best["mmcs"], 4),
                "best_l1": best["l1"],
            }
        )
    return out


def run() -> list[dict]:
    out = []
    goldilocks = [
        round(10 ** (e / 4), 8) for e in range(-17, -13)
    ]  # 5.6e-5 .. 3.2e-4, sum convention
    out += recovery("default (no resampling)", goldilocks)
    out += recovery(
        "no renormalisation after the step (the old trainer)", goldilocks, renormalise=False
    )
    out += recovery("resampling every 250 steps", goldilocks, resample_every=250)
    out += recovery(
        "resampling every 250 steps, candidates from one batch (the old pool)",
        goldilocks,
        resample_every=250,
        resample_pool=1,
    )
    out += recovery("--preset report", [10 ** (e / 4) for e in range(-6, 1, 2)], preset="report")
    return out
