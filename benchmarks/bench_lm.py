"""LM training tokens/s for `tiny` and `small`, next to the FLOP floor.

For each preset shape (random init, random GPT-2 token blocks, batch 8 x 256, AdamW), on 1 and
on 2 threads, in the same run:
- tokens/s of our training step (transformer body + chunked fused output-layer loss),
- tokens/s of the plain step (``model(x, labels=x).loss``: full fp32 logits) for `tiny`,
- the FLOP floor: 6 x parameters x tokens at the fp32 GEMM peak measured just before,
  i.e. the tokens/s a perfect implementation would reach; ``pct_of_floor`` = measured / floor.
Goal: >= 3,000 tokens/s for `tiny` on this 2-core machine. Absolute speeds move 3-4x with the
machine's load; the ratios inside one run are what to compare.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from unsuperpose.lm import build_model, model_loss, preset

BATCH, N_CTX = 8, 256


def gemm_peak(threads: int, n: int = 1024, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of an (2n x n) @ (n x 2n) matmul: the ceiling the floor is computed at."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2 * n, n), torch.randn(n, 2 * n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * (2 * n) * n * (2 * n) / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_tokens_per_s(name: str, threads: int, *, plain: bool, steps: int) -> tuple[float, int]:
    torch.set_num_threads(threads)
    model = build_model(preset(name)[0], seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 50257, (BATCH, N_CTX)))

    def step() -> None:
        loss = model(x, labels=x).loss if plain else model_loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, lazy init
    best = min(_timed(step) for _ in range(steps))
    params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    return BATCH * N_CTX / best, params


def run() -> list[dict]:
    threads_before = torch.get_num_threads()
    records = []
    try:
        for threads in (1, 2):
            peak = gemm_peak(threads)
            for name, steps, with_plain in (("tiny", 3, True), ("small", 1, False)):
                ours, params = step_tokens_per_s(name, threads, plain=False, steps=steps)
                floor = peak * 1e9 / (6 * params)
                record = {
                    "figure": f"train_tokens_per_s_{name}",
                    "threads": threads,
                    "tokens_per_s": round(ours),
                    "floor_tokens_per_s": round(floor),
                    "pct_of_floor": round(100 * ours / floor, 1),
                    "gemm_peak_gflops": round(peak, 1),
                    "params": params,
                    "batch": f"{BATCH}x{N_CTX}",
                }
                if with_plain:
                    plain, _ = step_tokens_per_s(name, threads, plain=True, steps=1)
                    record.update(
                        plain_tokens_per_s=round(plain), speedup_vs_plain=round(ours / plain, 2)
                    )
                if name == "tiny":
                    record["goal_tokens_per_s"] = 3000
                records.append(record)
    finally:
        torch.set_num_threads(threads_before)
    return records
