"""What several benchmarks need: the GEMM peak of this run and batches served from memory."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch


def gemm_peak(m: int = 2048, k: int = 1024, n: int = 4096, reps: int = 3) -> float:
    """GFLOP/s of an (m x k) @ (k x n) float32 product, measured now (the machine is shared)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def git_commit() -> str | None:
    """The checkout's short commit, with "-dirty" when tracked files differ from it: a record
    names the code that made it. None outside a git checkout."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return f"{commit}-dirty" if dirty else commit or None


def peers_python() -> str | None:
    """The interpreter of the peers' venv (SAELens, dictionary_learning, sparsify):
    ``$PEERS_PYTHON``, else /tmp/peers/bin/python; None when neither exists (the peers' figures
    are then skipped)."""
    exe = os.environ.get("PEERS_PYTHON") or "/tmp/peers/bin/python"
    return exe if Path(exe).exists() else None


@torch.no_grad()
def first_pre_activations(group, x: torch.Tensor) -> torch.Tensor:
    """(B, n): the pre-activations of the group's first dictionary on the rows of ``x``."""
    return group.pre_activations(x, group.dictionaries())[:, 0]


def _l0_cut(group, x: torch.Tensor, l0: int) -> torch.Tensor:
    """Per latent of the group's first dictionary, the pre-activation it exceeds on ``l0 / n``
    of the rows of ``x``: a cut there gives an average L0 of ``l0`` per row."""
    B, n = len(x), group.n
    return first_pre_activations(group, x).kthvalue(B - B * l0 // n, dim=0).values


@torch.no_grad()
def set_l0_thresholds(group, x: torch.Tensor, l0: int) -> None:
    """Start a JumpReLU group's thresholds where each latent fires on ``l0 / n`` of the rows of
    ``x``: an average L0 of ``l0`` per row, as a trained JumpReLU SAE runs (its default 1e-3
    thresholds let about half the latents through, a dense start no trained SAE has)."""
    group.extra["log_threshold"].copy_(_l0_cut(group, x, l0).clamp(min=1e-6).log())


@torch.no_grad()
def set_l0_bias(group, x: torch.Tensor, l0: int) -> None:
    """Lower a ReLU group's encoder bias so that each latent fires on ``l0 / n`` of the rows of
    ``x``: an average L0 of ``l0`` per row, the sparsity a trained ReLU SAE runs at (a fresh one
    lets about half its latents through)."""
    group.b_enc.view(group.S, group.n)[0] -= _l0_cut(group, x, l0)


@torch.no_grad()
def hold_dead(group, dead: int) -> None:
    """The last ``dead`` latents of every dictionary of a k-architecture's group held dead, so
    that AuxK works every step, as in a real run: an encoder bias of -30 keeps them out of every
    top-k, and their counters start past the group's dead threshold."""
    n = group.n
    group.b_enc.view(group.S, n)[:, n - dead :] = -30.0
    group.since_fired[:, n - dead :] = group.config.dead_window + 1


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
