"""The TopK step against EleutherAI's sparsify, side by side in one run; and
the BatchTopK, Matryoshka and JumpReLU fast paths against their autograd
groups, with ``TOPK_BENCH_ARCH``.

One SAE, 1024 -> 8192, k 32, batch 4,096, Adam, on the same synthetic batches (two
``torch.randn`` batches of seed 0, cycled). In interleaved rounds (the machine is shared, so every
figure is read against the others of its round):
- the GEMM peak of the encoder's shape, (4096 x 1024) @ (1024 x 8192), ``gemm_peak``;
- ours, sparse: the family's ``group`` (what the trainer trains: ``TopKFastGroup`` for topk),
  the trainer's step (forward_backward, finish_step, fused Adam, post_step);
- ours, autograd: the family's ``reference`` (``TopKGroup``), the same step (its dense AuxK work
  runs every step);
- sparsify 1.3 ``SparseCoder`` (TopK, k 32, its default config: no AuxK) with ``torch.optim.Adam``
  at its trainer's lr, its trainer's step (unit-norm decoder, forward with the batch's variance,
  fired mask, FVU read on the host, backward, gradient made tangent to the unit sphere, Adam,
  dead-token counters). It runs in a subprocess of ``$PEERS_PYTHON`` (default
  /tmp/peers/bin/python: a venv with torch 2.13.0 and eai-sparsify 1.3.3; skipped with a note if
  absent), built and warmed up once, then timed over the same number of steps in each round.
Both processes use 2 torch threads. Each rate is also printed as a fraction of the round's GEMM
peak, counting 10*b*d*n FLOPs per step as a yardstick (a dense SAE step's five GEMMs; the sparse
steps do fewer). ``TOPK_BENCH_ROUNDS`` / ``TOPK_BENCH_STEPS`` override 2 rounds of 3 steps.

``TOPK_BENCH_ARCH`` (default topk; batchtopk, matryoshka, jumprelu, or several, comma-separated)
picks the architectures, each measured in its own rounds; sparsify (a TopK SAE) runs beside
topk only. JumpReLU has no k: its thresholds start at each latent's 16th largest
pre-activation on the first batch, i.e. 32 active codes per row on average, with the paper's
bandwidth 0.001 and an L0 coefficient of 0.001.

``TOPK_BENCH_DEAD`` (default 0) holds that many of the last latents dead in ours, as bench_peers
does (``common.hold_dead``), so that the k-architectures' AuxK works every step. With none dead
the fast paths skip AuxK, while the autograd groups compute it (as zeros) every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import gemm_peak, hold_dead, peers_python, set_l0_thresholds
from unsuperpose.train import SAETrainConfig, get_family

B, D, N, K = 4096, 1024, 8192, 32
THREADS = 2

# The peer's side: reads a line per round from stdin, answers with one JSON line.
SPARSIFY = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from sparsify import SparseCoder, SparseCoderConfig

B, D, N, K = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
xs = [torch.randn(B, D) for _ in range(2)]
torch.manual_seed(0)
sae = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K), device="cpu", dtype=torch.float32)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (N / 2**14) ** 0.5)  # its trainer's default
since_fired = torch.zeros(N, dtype=torch.long)
did_fire = torch.zeros(N, dtype=torch.bool)
sae.b_dec.data = xs[0].mean(0)  # its trainer's first step
i = 0

def step():  # sparsify.trainer.Trainer.fit's step for one SAE, loss "fvu", auxk_alpha 0
    global i
    x = xs[i % 2]
    i += 1
    sae.set_decoder_norm_to_unit_norm()
    total_variance = (x - x.mean(0)).pow(2).sum()
    out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
    did_fire[out.latent_indices.flatten()] = True
    float(out.fvu.detach())
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    since_fired.add_(B)
    since_fired[did_fire] = 0
    did_fire.zero_()

step()
print("READY", flush=True)
for line in sys.stdin:
    steps = int(line)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    print("RESULT " + json.dumps({"samples_s": steps * B / (time.perf_counter() - t)}), flush=True)
"""


class _Sparsify:
    """The peer in its own interpreter, built once, timed on request."""

    def __init__(self, exe: str):
        self.proc = subprocess.Popen(
            [exe, "-c", SPARSIFY, str(B), str(D), str(N), str(K), str(THREADS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read("READY")

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"sparsify exited ({self.proc.wait()}) before {prefix!r}")

    def rate(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))["samples_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class OursStep:
    """One group of one dictionary and the trainer's step on it, on the batches' device.

    ``n`` and ``k`` default to this bench's shape; the batch size and width are the batches'.
    ``dead``: the last latents held dead (``common.hold_dead``; not for jumprelu, it has no AuxK).
    With ``bf16`` the group's ``forward_backward`` runs under ``torch.autocast(bfloat16)`` (the
    parameters and Adam stay float32): the trainer has no such option; benchmarks/gpu_check.py
    reads what it would gain."""

    def __init__(
        self, arch: str, cls, xs: list[torch.Tensor], *, n: int = N, k: int = K, dead: int = 0
    ):
        b, d = xs[0].shape
        value = 1e-3 if arch == "jumprelu" else k
        cfg = SAETrainConfig(
            arch=arch,
            dict_sizes=[n],
            batch_size=b,
            lr=1e-3,
            sparsity=[value],
        )
        self.g = cls(d, n, [value], cfg, seed=0, device=xs[0].device)
        if arch == "jumprelu":  # each latent fires on b*k/n of the first batch's b rows
            set_l0_thresholds(self.g, xs[0], k)
        elif dead:
            hold_dead(self.g, dead)
        self.opt = torch.optim.Adam(
            self.g.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True
        )
        self.xs, self.i, self.bf16 = xs, 0, False
        self.step()  # warm-up

    def step(self) -> None:  # train_steps' inner loop
        x = self.xs[self.i % len(self.xs)]
        self.i += 1
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            reductions = self.g.forward_backward(x)
        self.g.finish_step(reductions, self.i)
        self.opt.step()
        self.g.post_step()

    def rate(self, steps: int) -> float:
        """Samples/s over ``steps`` steps (a GPU's queue drained before and after)."""
        cuda = self.xs[0].device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        if cuda:
            torch.cuda.synchronize()
        return steps * len(self.xs[0]) / (time.perf_counter() - t)


def run():
    rounds = int(os.environ.get("TOPK_BENCH_ROUNDS", 2))
    steps = int(os.environ.get("TOPK_BENCH_STEPS", 3))
    archs = os.environ.get("TOPK_BENCH_ARCH", "topk").split(",")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for arch in archs:
            yield from _run(arch.strip(), rounds, steps)
    finally:
        torch.set_num_threads(threads)


def _run(arch: str, rounds: int, steps: int):
    family = get_family(arch)
    if family.reference is None or family.group is family.reference:
        raise ValueError(f"{arch} has no fast path to compare with its autograd group")
    torch.manual_seed(0)
    xs = [torch.randn(B, D) for _ in range(2)]  # the subprocess draws the same two
    exe = peers_python() if arch == "topk" else None
    peer = _Sparsify(exe) if exe else None
    if peer is None and arch == "topk":
        yield {"note": "sparsify skipped: no $PEERS_PYTHON or /tmp/peers/bin/python"}
    dead = 0 if arch == "jumprelu" else int(os.environ.get("TOPK_BENCH_DEAD", 0))
    sparse = OursStep(arch, family.group, xs, dead=dead)
    methods = {
        "ours_sparse": sparse.rate,
        "ours_autograd": OursStep(arch, family.reference, xs, dead=dead).rate,
    }
    if peer:
        methods["sparsify"] = peer.rate
    flops = 10 * B * D * N  # per step, the yardstick
    rates: dict[str, list[float]] = {m: [] for m in methods}
    peaks = []
    try:
        for r in range(rounds):
            peak = gemm_peak(B, D, N)
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for m in order:
                rates[m].append(methods[m](steps))
            peak = max(peak, gemm_peak(B, D, N))  # the better of two reads around the round
            peaks.append(peak)
            row = {"arch": arch, "round": r, "gemm_peak_gflops": round(peak, 1), "steps": steps}
            for m in methods:
                row[f"{m}_samples_s"] = round(rates[m][-1])
                row[f"{m}_of_peak"] = round(rates[m][-1] * flops / B / (peak * 1e9), 3)
            row["sparse_vs_autograd"] = round(
                rates["ours_sparse"][-1] / rates["ours_autograd"][-1], 2
            )
            if peer:
                row["sparse_vs_sparsify"] = round(
                    rates["ours_sparse"][-1] / rates["sparsify"][-1], 2
                )
            yield row
    finally:
        if peer:
            peer.close()
    knob = "L0 32 at the start" if arch == "jumprelu" else f"k {K}"
    summary = {
        "arch": arch,
        "shape": f"{D}->{N}, batch {B}, {knob}",
        "dead_latents_held": dead,
        "rounds": rounds,
        "gemm_peak_gflops": [round(p, 1) for p in peaks],
    }
    for m in methods:
        summary[f"{m}_samples_s"] = [round(v) for v in rates[m]]
    summary["sparse_vs_autograd"] = [
        round(a / b, 2) for a, b in zip(rates["ours_sparse"], rates["ours_autograd"])
    ]
    # What the fast path ran on: active codes per row over all its steps (the jumprelu ones
    # are not fixed), and the steps it handed to the autograd step as too dense (jumprelu).
    g = sparse.g
    summary["sparse_l0"] = round(float(g.stats[2].sum()) / g.stat_rows, 1)
    if hasattr(g, "dense_steps"):
        summary["sparse_dense_steps"] = g.dense_steps
    ratio = [a / b for a, b in zip(rates["ours_sparse"], rates.get("sparsify", []))]
    if ratio:
        summary["sparse_vs_sparsify"] = [round(v, 2) for v in ratio]
        summary["goal_1_5x_met"] = min(ratio) >= 1.5
    yield summary


if __name__ == "__main__":
    for record in run():
        print(json.dumps(record), file=sys.stdout, flush=True)
