"""What storing costs the harvest, and how fast a store feeds SAE training.

All on a random GPT-2 of the report's `small` shape (6 layers, d_model 256, MLP 1024, n_ctx 256,
GPT-2 vocabulary), built here with transformers so no trained model is needed:
- harvest_overhead: harvest tokens/s (layer 1 into a store) next to forward-only tokens/s of the
  same model, hook and batches in the same run (goal: storage costs <= 10%).
- store_size: bytes per stored activation (bfloat16 is 2 before compression).
- reader_throughput: shuffled samples/s of ActivationStore.batches at width 1024, next to the
  samples/s of a plain torch SAE step 1024 -> 8192 measured here (goal: >= 5x what training
  consumes).
- harvest_peak_rss: peak RSS of a harvest of 1x and 10x the tokens, each in a fresh process
  (goal: the same: memory is bounded by a few chunks, not the corpus).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unsuperpose.harvest import ActivationStore, HarvestConfig, harvest, hooks, store, stream
from unsuperpose.harvest.writer import ChunkWriter

N_CTX, BATCH, LAYER = 256, 32, 1


def save_small_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=6, n_embd=256, n_inner=1024, n_head=4, n_positions=N_CTX)
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    return path


def boot(path: Path):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)


def random_blocks(n_tokens: int, vocab: int = 50257, n_ctx: int = N_CTX) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (n_tokens // n_ctx, n_ctx)).astype(np.uint16)


def harvest_into(
    bridge, blocks: np.ndarray, out: Path, *, layer: int = LAYER, batch: int = BATCH
) -> Path:
    [path] = harvest(
        bridge,
        blocks,
        out,
        HarvestConfig(layer=str(layer), batch_size=batch),
        model_dir="random-gpt2-small",
        weights_sha256="random",
        corpus_fingerprint="random",
        progress=False,
    )
    return path


def _timed_forward(spent: list[float]):
    """stream.forward, adding its wall time to spent[0] (to see what the harvest adds around it)."""
    real = stream.forward

    def forward(*args, **kw):
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    return real, forward


def harvest_overhead(bridge, work: Path) -> tuple[list[dict], Path]:
    blocks = random_blocks(4 * BATCH * N_CTX)  # 4 forward batches, 32k tokens
    hook = f"blocks.{LAYER}.mlp.hook_post"
    stop = hooks.stop_hook([hooks.Target(hook, LAYER, work)])
    stream.forward(bridge, blocks[:BATCH], [hook], stop)  # warm-up
    fwd, hv, inside, spent, path = [], [], [], [0.0], None
    real, timed = _timed_forward(spent)
    for rep in range(3):  # interleaved pairs, median: the machine is shared
        t = time.perf_counter()
        for b in range(0, len(blocks), BATCH):
            stream.forward(bridge, blocks[b : b + BATCH], [hook], stop)
        fwd.append(time.perf_counter() - t)
        spent[0], stream.forward = 0.0, timed
        try:
            t = time.perf_counter()
            path = harvest_into(bridge, blocks, work / f"run{rep}")
            hv.append(time.perf_counter() - t)
        finally:
            stream.forward = real
        inside.append(spent[0] / hv[-1])
    f, h = float(np.median(fwd)), float(np.median(hv))
    acts_bytes = sum(p.stat().st_size for p in (path / store.ACTS).rglob("*") if p.is_file())
    side_bytes = sum(
        p.stat().st_size
        for name in (store.TOKENS, store.POSITIONS)
        for p in (path / name).rglob("*")
        if p.is_file()
    )
    rows, d = blocks.size, ActivationStore(path).d
    return [
        {
            "figure": "harvest_overhead",
            "model": "random GPT-2 small shape (d 256, MLP 1024)",
            "hook": hook,
            "tokens": rows,
            "forward_only_tokens_per_s": round(rows / f),
            "harvest_tokens_per_s": round(rows / h),
            "storage_overhead_pct": round(100 * (h / f - 1), 1),
            "harvest_time_in_forward_pct": round(100 * float(np.median(inside)), 1),
            "goal_pct": 10,
        },
        {
            "figure": "store_size",
            "rows": rows,
            "d": d,
            "bytes_per_activation": round(acts_bytes / (rows * d), 3),
            "compression_ratio": round(2 * rows * d / acts_bytes, 3),
            "tokens_positions_bytes_per_row": round(side_bytes / rows, 3),
        },
    ], path


def sae_samples_per_s(d: int = 1024, n: int = 8192, batch: int = 1024, steps: int = 3) -> float:
    """A plain torch SAE step (encode, ReLU, decode, MSE + L1, backward, Adam)."""
    w_enc = torch.nn.Parameter(torch.randn(d, n) / d**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(n))
    w_dec = torch.nn.Parameter(torch.randn(n, d) / n**0.5)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec], lr=1e-3)
    x = torch.randn(batch, d)

    def step():
        f = torch.relu(x @ w_enc + b_enc)
        loss = (f @ w_dec - x).pow(2).mean() + 1e-3 * f.abs().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)


def reader_throughput(harvested: Path, work: Path) -> list[dict]:
    """Shuffled reading of 128k harvested rows (the 32k harvested ones, tiled 4 times)."""
    src = ActivationStore(harvested)
    rows_real = src.read_rows(0, src.rows)
    rows = 4 * src.rows
    prov = store.provenance(src._group)
    group = store.create(
        work / "big.zarr", prov, rows, store.default_chunk_rows(src.d), batch_size=1
    )
    writer = ChunkWriter(group, 0, rows)
    for _ in range(4):
        writer.add(rows_real, np.zeros(src.rows, np.int32), np.zeros(src.rows, np.int32))
    writer.close()
    big = ActivationStore(work / "big.zarr")
    batch = 4096
    it = big.batches(batch, seed=0)
    next(it)  # thread start and first group
    n = rows // batch * 2
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    it.close()
    reader = n * batch / (time.perf_counter() - t)
    sae = sae_samples_per_s()
    return [
        {
            "figure": "reader_throughput",
            "rows": rows,
            "d": big.d,
            "batch": batch,
            "shuffled_samples_per_s": round(reader),
            "sae_1024x8192_samples_per_s": round(sae),
            "reader_vs_sae_measured": round(reader / sae, 1),
            "goal_ratio": 5,
        }
    ]


RSS_CHILD = """
import json, resource, sys, numpy as np, torch
from benchmarks.bench_harvest import boot, harvest_into, random_blocks
bridge = boot(sys.argv[1])
harvest_into(bridge, random_blocks(int(sys.argv[2])), __import__('pathlib').Path(sys.argv[3]))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss(model: Path, work: Path) -> list[dict]:
    out = {}
    for mult in (1, 10):
        tokens = mult * BATCH * N_CTX  # 8k and 82k tokens
        res = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(model), str(tokens), str(work / f"rss{mult}")],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        out[mult] = (tokens, json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"])
    return [
        {
            "figure": "harvest_peak_rss",
            "tokens_1x": out[1][0],
            "tokens_10x": out[10][0],
            "peak_rss_mib_1x": round(out[1][1]),
            "peak_rss_mib_10x": round(out[10][1]),
            "ratio_10x_vs_1x": round(out[10][1] / out[1][1], 3),
        }
    ]


def run() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_harvest_") as tmp:
        work = Path(tmp)
        model = save_small_gpt2(work / "gpt2-small")
        figures, harvested = harvest_overhead(boot(model), work)
        figures += reader_throughput(harvested, work)
        figures += peak_rss(model, work)
    return figures


if __name__ == "__main__":
    for fig in run():
        print(json.dumps(fig))
