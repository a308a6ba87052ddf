"""What several benchmarks need: the GEMM peak of this run and batches served from memory."""

from __future__ import annotations

import time

import torch


def gemm_peak(m: int = 2048, k: int = 1024, n: int = 4096, reps: int = 3) -> float:
    """GFLOP/s of an (m x k) @ (k x n) float32 product, measured now (the machine is shared)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


class RamSource:
    """Pre-made batches cycled from memory: measures the trainer, not data generation."""

    def __init__(self, xs: list[torch.Tensor]):
        self.xs = xs

    @property
    def d(self) -> int:
        return self.xs[0].shape[1]

    def batches(self, batch_size, *, seed=0, start=0):
        i = start
        while True:
            yield self.xs[i % len(self.xs)]
            i += 1


def pointer_where(p: dict | None) -> str:
    """A diagnosis record's pointer as a ratio of the base ("1x"; ">2x" for a lower bound)."""
    if p is None or p["size"] is None:
        return "none"
    return f">{p['ratio']:g}x" if p["lower_bound"] else f"{p['ratio']:g}x"
