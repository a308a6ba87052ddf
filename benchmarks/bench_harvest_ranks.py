"""Harvest scale-out: 1 vs 2 processes here, bf16 autocast vs fp32 (and on a GPU).

All on a random-initialised LM of the `small` preset (6 layers, d_model 256, MLP 1024, n_ctx 256;
nothing downloaded), layer 1's MLP into a store, random token blocks:
- harvest_ranks: harvest tokens/s of one process (its default threads, and 1 thread) and of
  `torchrun --nproc_per_node 2` (1 thread each) into the same kind of store, timed inside the
  processes (torchrun's start-up excluded), and whether the two stores' chunk files are
  byte-for-byte the same.
- bf16_vs_fp32: how far the stored activations of a bf16-autocast forward are from those of an
  fp32 forward (relative to the values' scale, and in bf16 ulps), with both harvests' tokens/s.
  On this CPU, autocast stands in for the GPU's (it is slower here: no bf16 units). On a GPU
  (torch.cuda.is_available()) the same figures come from CUDA, with more tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

N_CTX, BATCH, LAYER = 256, 32, 1
REPO = Path(__file__).resolve().parent.parent


def save_small_lm(path: Path) -> Path:
    from unsuperpose.lm import build_model, preset, save_model

    cfg = preset("small")[0]
    save_model(build_model(cfg, seed=0), path, lm_config=cfg)
    return path


def child(model: str, out: str, tokens: int, device: str, precision: str) -> None:
    """One rank of a timed harvest (run by `python -m benchmarks.bench_harvest_ranks child ...`)."""
    from unsuperpose import distributed
    from unsuperpose.harvest import HarvestConfig, harvest
    from unsuperpose.lm import load_bridge

    place = distributed.setup(device)
    bridge = load_bridge(model, device=place.device)
    blocks = np.random.default_rng(0).integers(0, 50257, (tokens // N_CTX, N_CTX)).astype(np.uint16)
    cfg = HarvestConfig(layer=str(LAYER), batch_size=BATCH, device=device, precision=precision)
    distributed.barrier()
    t = time.perf_counter()
    harvest(
        bridge,
        blocks,
        out,
        cfg,
        model_dir=model,
        weights_sha256="random",
        corpus_fingerprint="random",
        progress=False,
    )
    if place.device.type == "cuda":
        torch.cuda.synchronize(place.device)
    distributed.barrier()
    seconds = time.perf_counter() - t
    if distributed.is_main():
        print(
            "RESULT "
            + json.dumps(
                {
                    "seconds": seconds,
                    "tokens": int(blocks.size),
                    "threads": torch.get_num_threads(),
                    **place.describe(),
                }
            )
        )
    distributed.teardown()
    distributed.leave(0)


def timed(
    model: Path,
    out: Path,
    tokens: int,
    *,
    procs: int = 1,
    device: str = "cpu",
    precision: str = "auto",
    threads: int | None = None,
) -> dict:
    args = ["child", str(model), str(out), str(tokens), device, precision]
    if procs == 1:
        cmd = [sys.executable, "-m", "benchmarks.bench_harvest_ranks", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            "-m",
            "benchmarks.bench_harvest_ranks",
            *args,
        ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
        },
    )
    [line] = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    got = json.loads(line[len("RESULT ") :])
    got["tokens_per_s"] = round(got["tokens"] / got["seconds"])
    return got


def chunk_files(store: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(store)): p.read_bytes()
        for name in ("acts", "tokens", "positions", "heldout")
        for p in sorted((store / name).rglob("*"))
        if p.is_file()
    }


def bf16_difference(fp32_store: Path, bf16_store: Path) -> dict:
    """How far the bf16-autocast rows are from the fp32 ones: relative to the scale, and in ulps."""
    import zarr

    from unsuperpose.harvest import register_bfloat16

    register_bfloat16()

    a = zarr.open_group(fp32_store, mode="r")["acts"][:]
    b = zarr.open_group(bf16_store, mode="r")["acts"][:]
    x, y = a.astype(np.float32), b.astype(np.float32)
    diff = np.abs(x - y)
    # bf16 bit patterns, as integers ordered like the values they encode: their distance is ulps
    ia, ib = (v.view(np.int16).astype(np.int32) for v in (a, b))
    oa, ob = (np.where(i < 0, -(i & 0x7FFF), i) for i in (ia, ib))
    ulps = np.abs(oa - ob)
    return {
        "values": int(x.size),
        "max_abs_diff": float(diff.max()),
        "max_abs_value": float(np.abs(x).max()),
        "max_abs_diff_rel_to_max": round(float(diff.max() / np.abs(x).max()), 5),
        "mean_abs_diff_rel_to_mean_abs": round(float(diff.mean() / np.abs(x).mean()), 5),
        "frac_identical": round(float((ulps == 0).mean()), 4),
        "frac_more_than_1_ulp": round(float((ulps > 1).mean()), 4),
        "median_ulps": float(np.median(ulps)),
        "p99_ulps": float(np.percentile(ulps, 99)),
    }


def run() -> list[dict]:
    figures = []
    with tempfile.TemporaryDirectory(prefix="bench_harvest_ranks_") as tmp:
        work = Path(tmp)
        model = save_small_lm(work / "small")
        tokens = 8 * BATCH * N_CTX  # 65,536 tokens: 8 forward batches, 16 chunks
        one = timed(model, work / "one", tokens, procs=1)
        single = timed(model, work / "single", tokens, procs=1, threads=1)
        two = timed(model, work / "two", tokens, procs=2)
        ref = chunk_files(work / "one" / f"layer{LAYER}.zarr")
        same = ref == chunk_files(work / "two" / f"layer{LAYER}.zarr")
        same_1t = ref == chunk_files(work / "single" / f"layer{LAYER}.zarr")
        figures.append(
            {
                "figure": "harvest_ranks",
                "model": "random `small` (d 256, MLP 1024)",
                "device": "cpu",
                "tokens": tokens,
                "one_process_tokens_per_s": one["tokens_per_s"],
                "one_process_threads": one["threads"],
                "one_process_1_thread_tokens_per_s": single["tokens_per_s"],
                "two_processes_tokens_per_s": two["tokens_per_s"],
                "threads_per_process": two["threads"],
                "speedup": round(two["tokens_per_s"] / one["tokens_per_s"], 2),
                "speedup_vs_1_thread": round(two["tokens_per_s"] / single["tokens_per_s"], 2),
                "stores_bit_identical": same,
                "one_thread_store_bit_identical": same_1t,
                "cpu_count": os.cpu_count(),
            }
        )
        if torch.cuda.is_available():
            gpu_tokens = 64 * BATCH * N_CTX  # 524,288 tokens
            fp = timed(model, work / "gpu_fp32", gpu_tokens, device="cuda", precision="fp32")
            bf = timed(model, work / "gpu_bf16", gpu_tokens, device="cuda", precision="bf16")
            figures.append(
                {
                    "figure": "bf16_vs_fp32",
                    "device": fp["device_name"],
                    "tokens": gpu_tokens,
                    "fp32_tokens_per_s": fp["tokens_per_s"],
                    "bf16_tokens_per_s": bf["tokens_per_s"],
                    **bf16_difference(
                        work / "gpu_fp32" / f"layer{LAYER}.zarr",
                        work / "gpu_bf16" / f"layer{LAYER}.zarr",
                    ),
                }
            )
        cpu_tokens = 2 * BATCH * N_CTX  # 16,384 tokens: CPU bf16 autocast is slow
        fp = timed(model, work / "cpu_fp32", cpu_tokens, precision="fp32")
        bf = timed(model, work / "cpu_bf16", cpu_tokens, precision="bf16")
        figures.append(
            {
                "figure": "bf16_vs_fp32",
                "device": "cpu (autocast, a stand-in for CUDA's)",
                "tokens": cpu_tokens,
                "fp32_tokens_per_s": fp["tokens_per_s"],
                "bf16_tokens_per_s": bf["tokens_per_s"],
                **bf16_difference(
                    work / "cpu_fp32" / f"layer{LAYER}.zarr",
                    work / "cpu_bf16" / f"layer{LAYER}.zarr",
                ),
            }
        )
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        for fig in run():
            print(json.dumps(fig))
