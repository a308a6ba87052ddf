"""The toy grid's figures: grid throughput vs GEMM peak (recovery and the diagnostics moved to
bench_diagnostics).

- throughput: SAE-steps/s and GFLOP/s (10*b*d*n FLOPs per SAE step) of the grid trainer at toy
  sizes, next to a loop of lone autograd SAEs and the GEMM peak, all measured in this run.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import RamSource, gemm_peak
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import SAE, SAETrainConfig, new_state, train_steps
from unsuperpose.train.init import init_params


def grid_throughput(
    n_l1: int = 8, d: int = 256, n: int = 512, batch: int = 256, steps: int = 60
) -> list[dict]:
    src = ToySource(ToyConfig(h=d))
    xs = [x for _, x in zip(range(steps), src.batches(batch))]
    flops_per_sae_step = 10 * batch * d * n
    # grid: n_l1 SAEs of one size in one pass (the batches are ready in RAM: this measures the
    # trainer)
    cfg = SAETrainConfig(
        sparsity=[10 ** (-4 + i / 4) for i in range(n_l1)],
        dict_sizes=[n],
        steps=steps,
        batch_size=batch,
        log_every=steps,
    )

    state = new_state(RamSource(xs), cfg)
    train_steps(state, RamSource(xs), until=5, progress=False)
    t = time.perf_counter()
    train_steps(state, RamSource(xs), progress=False)
    grid_s = time.perf_counter() - t
    grid_rate = n_l1 * (steps - 5) / grid_s
    # the same SAEs one after another, each a plain autograd module + Adam
    t = time.perf_counter()
    for l1 in cfg.sparsity:
        sae = SAE(d, n, params=init_params(d, n, seed=0))
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for x in xs[: steps - 5]:
            opt.zero_grad()
            sae.loss(x, l1).backward()
            opt.step()
    loop_rate = n_l1 * (steps - 5) / (time.perf_counter() - t)
    peak = gemm_peak()
    return [
        {
            "figure": "toy_grid_throughput",
            "shape": f"{n_l1} x {d}->{n}, batch {batch}",
            "grid_sae_steps_per_s": round(grid_rate, 1),
            "grid_gflops": round(grid_rate * flops_per_sae_step / 1e9, 1),
            "loop_sae_steps_per_s": round(loop_rate, 1),
            "loop_gflops": round(loop_rate * flops_per_sae_step / 1e9, 1),
            "gemm_peak_gflops": round(peak, 1),
            "grid_pct_of_peak": round(100 * grid_rate * flops_per_sae_step / 1e9 / peak, 1),
            "loop_pct_of_peak": round(100 * loop_rate * flops_per_sae_step / 1e9 / peak, 1),
            "grid_vs_loop": round(grid_rate / loop_rate, 2),
        }
    ]


def run() -> list[dict]:
    return grid_throughput()
