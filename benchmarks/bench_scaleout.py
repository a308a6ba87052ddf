"""Training scale-out: one process vs two under torchrun, and the GPU when there is one.

On any machine:
- the same toy grid trained by one process (its threads, and one thread) and by two processes
  under torchrun (gloo), split by sizes (``--parallel grid``) and by batch slices (``data``): wall
  time, the trainer's samples/s from its log, and whether the grid split's weights equal the
  one-thread process's byte for byte (what the tests assert; here on a bigger grid).
On a CUDA machine, in addition:
- one 1024 -> 8192 SAE and a grid of 4 L1 values at that size, batch 4,096, samples/s and % of the
  float32 matmul peak measured in the same run (twice; TF32 off as in training's default);
- the wall time of ``unsuperpose toy --grid paper`` (the report's 17 x 9 grid, 20,000 steps);
- the same seed's toy grid on the CPU and on the GPU (toy batches drawn on the CPU for both):
  the largest weight difference and the MMCS of each, side by side.
A step is counted as 10*b*d*n FLOPs per SAE (five dense GEMMs), as in bench_train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TOY = [
    "toy",
    "--h",
    "64",
    "--g",
    "128",
    "--dict-sizes",
    "1/2x,1x,2x,4x",
    "--l1",
    "1e-4,3e-4,1e-3",
    "--steps",
    "600",
    "--batch-size",
    "256",
    "--log-every",
    "100",
    "--eval-every",
    "300",
    "--no-progress",
    "--wandb",
    "disabled",
    "--device",
    "cpu",
]  # CPU processes (gloo), also on a GPU machine


def _run(
    cmd: list[str], env: dict, timeout: float | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t, done


def _logged_rate(out: Path) -> float:
    rows = [
        json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()
    ]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # the first has start-up
    return sum(rates) / max(len(rates), 1)


def _weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in sorted(out.glob("saes/*/sae.safetensors"))}


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[s][k].float() - b[s][k].float()).abs().max()) for s in a for k in a[s])


def processes() -> list[dict]:
    py = [sys.executable, "-m", "unsuperpose"]
    run2 = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "unsuperpose",
    ]
    base = {**os.environ, "WANDB_MODE": "disabled"}
    one_thread = {**base, "OMP_NUM_THREADS": "1"}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {
            "1 process, all threads": (py, base, []),
            "1 process, 1 thread": (py, one_thread, []),
            "2 processes, --parallel grid": (run2, one_thread, ["--parallel", "grid"]),
            "2 processes, --parallel data": (run2, one_thread, ["--parallel", "data"]),
        }
        outs = {}
        for i, (what, (cmd, env, extra)) in enumerate(runs.items()):
            out = tmp / f"run{i}"
            wall, _ = _run(cmd + TOY + extra + ["--out", str(out)], env)
            outs[what] = out
            records.append(
                {
                    "what": f"toy grid 4 sizes x 3 L1, h 64, 600 steps: {what}",
                    "wall_s": round(wall, 1),
                    "samples_per_s": round(_logged_rate(out)),
                }
            )
        ref = _weights(outs["1 process, 1 thread"])
        records.append(
            {
                "what": "grid split vs 1 process (1 thread): weights byte-identical",
                "identical": _max_diff(ref, _weights(outs["2 processes, --parallel grid"])) == 0,
            }
        )
        records.append(
            {
                "what": "data parallel vs 1 process (1 thread): largest weight difference",
                "max_abs_diff": _max_diff(ref, _weights(outs["2 processes, --parallel data"])),
            }
        )
    return records


def _cuda_peak(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def gpu_step(b: int = 4096, d: int = 1024, n: int = 8192) -> list[dict]:
    from benchmarks.common import RamSource
    from unsuperpose.train import SAETrainConfig, new_state, train_steps

    torch.backends.cuda.matmul.allow_tf32 = False
    src = RamSource([torch.randn(b, d, device="cuda") for _ in range(2)])
    records = []
    for n_l1 in (1, 4):
        cfg = SAETrainConfig(
            sparsity=[10 ** -(3 + i / 2) for i in range(n_l1)],
            dict_sizes=[n],
            batch_size=b,
            steps=10_000,
            resample_every=0,
            log_every=10_000,
        )
        state = new_state(src, cfg, device="cuda")
        peak_before = _cuda_peak()
        train_steps(state, src, until=5, progress=False)
        torch.cuda.synchronize()
        steps = 50
        t = time.perf_counter()
        train_steps(state, src, until=5 + steps, progress=False)
        torch.cuda.synchronize()
        rate = steps * b / (time.perf_counter() - t)
        peak = max(peak_before, _cuda_peak())
        records.append(
            {
                "what": f"GPU: {n_l1} SAE(s) {d} -> {n}, batch {b}, fp32",
                "samples_per_s": round(rate),
                "pct_of_matmul_peak": round(100 * rate * 10 * d * n * n_l1 / 1e9 / peak, 1),
                "matmul_peak_gflops": round(peak),
                "device": torch.cuda.get_device_name(),
            }
        )
    return records


PAPER_STEPS = 20_000  # what `toy --grid paper` trains unless --steps says otherwise


def paper_toy(device: str = "cuda", extra: tuple[str, ...] = (), timeout: float | None = None):
    """Wall time of ``unsuperpose toy --grid paper`` (``extra`` flags added) on ``device``.

    With ``timeout``: a run still training then is stopped, and the record says the step its
    log reached and the training time projected from it to the last step, so a budget that is
    too short still gives a figure (marked ``projected``)."""
    steps = int(extra[extra.index("--steps") + 1]) if "--steps" in extra else PAPER_STEPS
    cmd = [sys.executable, "-m", "unsuperpose", "toy", "--grid", "paper", "--device", device]
    cmd += ["--no-progress", "--wandb", "disabled", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "paper"
        t = time.perf_counter()
        try:
            wall, done = _run(
                cmd + ["--out", str(out)], {**os.environ, "WANDB_MODE": "disabled"}, timeout
            )
        except subprocess.TimeoutExpired:
            wall = time.perf_counter() - t
            log = out / "log.jsonl"
            rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            reached = max((r["step"] for r in rows if "step" in r), default=0)
            return {
                "wall_s": round(wall, 1),
                "finished": False,
                "step_reached": reached,
                "steps": steps,
                "projected_training_s": round(wall * steps / reached, 1) if reached else None,
            }
        printed = [
            line
            for line in done.stdout.splitlines()
            if line.startswith(("best MMCS", "dead", "loss", "MMCS"))
        ]
    return {"wall_s": round(wall, 1), "finished": True, "steps": steps, "printed": printed}


def gpu_paper_toy() -> list[dict]:
    rec = paper_toy("cuda")
    return [
        {
            "what": "GPU: unsuperpose toy --grid paper (17 L1 x 9 sizes, 20,000 steps)",
            "wall_s": rec["wall_s"],
            "wall_min": round(rec["wall_s"] / 60, 2),
            "printed": rec["printed"],
            "device": torch.cuda.get_device_name(),
        }
    ]


SAME_SEED_TOY = (
    "toy",
    "--h",
    "64",
    "--g",
    "128",
    "--dict-sizes",
    "1/2x,1x,2x",
    "--l1",
    "1e-4,1e-3",
    "--no-progress",
    "--wandb",
    "disabled",
    "--data-rng",
    "cpu",
)


def same_seed(
    devices: tuple[str, ...] = ("cpu", "cuda"),
    steps: int = 1000,
    toy: tuple[str, ...] = SAME_SEED_TOY,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> dict:
    """One toy grid of one seed trained by one process per entry of ``devices`` (toy batches
    drawn on the CPU for all), each saved dictionary compared with the first run's: the largest
    weight difference, and whether every tensor is within ``atol + rtol * |first|``."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        walls, rows, weights = [], [], []
        for i, dev in enumerate(devices):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "unsuperpose", *toy, "--steps", str(steps)]
            wall, _ = _run(cmd + ["--device", dev, "--out", str(out)], env)
            walls.append(round(wall, 1))
            rows.append((out / "summary.csv").read_text().splitlines())
            weights.append(_weights(out))
    ref = weights[0]
    col = rows[0][0].split(",").index("mmcs")
    compared = []
    for other, table in zip(weights[1:], rows[1:]):
        excess = max(
            float(((ref[s][k] - other[s][k]).abs() - atol - rtol * ref[s][k].abs()).max())
            for s in ref
            for k in ref[s]
        )
        compared.append(
            {
                "max_abs_weight_diff": _max_diff(ref, other),
                "within_tolerance": excess <= 0,
                "l1_size_mmcs": [
                    (r.split(",")[0], r.split(",")[1], r.split(",")[col], o.split(",")[col])
                    for r, o in zip(rows[0][1:], table[1:])
                ],
            }
        )
    return {
        "devices": list(devices),
        "wall_s": walls,
        "rtol": rtol,
        "atol": atol,
        "vs_first": compared,
    }


def cpu_vs_gpu() -> list[dict]:
    rec = same_seed(("cpu", "cuda"))
    [vs] = rec["vs_first"]
    return [
        {
            "what": "same seed, CPU vs GPU (toy batches drawn on the CPU for both), 1,000 steps",
            "max_abs_weight_diff": vs["max_abs_weight_diff"],
            "wall_s_cpu": rec["wall_s"][0],
            "wall_s_gpu": rec["wall_s"][1],
            "l1_size_mmcs_cpu_mmcs_gpu": vs["l1_size_mmcs"],
        }
    ]


def run() -> list[dict]:
    records = processes()
    if torch.cuda.is_available():
        records += gpu_step() + cpu_vs_gpu() + gpu_paper_toy()
    else:
        records.append({"what": "GPU figures", "skipped": "no CUDA device on this machine"})
    return records
