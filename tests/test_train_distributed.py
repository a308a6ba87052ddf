"""SAE training on a device and under torchrun (gloo, 2 processes on this CPU).

The grid split must give one process's bytes, data parallelism one process's numbers within
float tolerance, and a run must resume under any number of processes. A one-process baseline
runs with OMP_NUM_THREADS=1 like each torchrun process, since float sums may depend on threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unsuperpose import distributed
from unsuperpose.errors import UserError
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import SAETrainConfig, new_state, train_steps
from unsuperpose.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from unsuperpose.train.parallel import ShardingError, assign_sizes, plan
from waiting import kill_when

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
TOY = [
    "toy",
    "--h",
    "16",
    "--g",
    "32",
    "--dict-sizes",
    "1/2x,1x,2x",
    "--l1",
    "1e-4,1e-3",
    "--batch-size",
    "64",
    "--log-every",
    "25",
    "--eval-every",
    "50",
    "--no-progress",
    "--wandb",
    "disabled",
]


def one_process(args: list[str], out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unsuperpose", *args, "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun_cmd(args: list[str], out: Path, n: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        "-m",
        "unsuperpose",
        *args,
        "--out",
        str(out),
    ]


def two_processes(args: list[str], out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(args, out), env=ENV, capture_output=True, text=True, timeout=timeout
    )


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in sorted(out.glob("saes/*/sae.safetensors"))}


def assert_same_bytes(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa and wa.keys() == wb.keys()
    for name in wa:
        for k in wa[name]:
            assert torch.equal(wa[name][k], wb[name][k]), (name, k)
    assert (a / "summary.csv").read_text() == (b / "summary.csv").read_text()
    assert (a / "history.jsonl").read_text() == (b / "history.jsonl").read_text()


def test_sizes_are_dealt_largest_first_to_the_least_loaded_rank():
    assert assign_sizes([16, 32, 64], 2) == [1, 1, 0]
    assert assign_sizes([64, 64, 64, 64], 2) == [0, 1, 0, 1]
    assert plan([16, 32, 64], "grid", rank=1, world_size=2).owned == (0, 1)
    assert plan([16, 32, 64], "data", rank=1, world_size=2).owned == (0, 1, 2)
    with pytest.raises(ShardingError, match="only 3 size.*use mode='data'"):
        plan([16, 32, 64], "grid", rank=0, world_size=4)


SHORT = TOY + ["--steps", "150"]
LONG = TOY + ["--steps", "800", "--checkpoint-every", "100"]


def _baseline(tmp_path_factory, args: list[str]) -> Path:
    out = tmp_path_factory.mktemp("baseline") / "toy"
    run = one_process(args, out)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def solo(tmp_path_factory) -> Path:
    """One process, one thread, the short run: what the two-process runs are compared with."""
    return _baseline(tmp_path_factory, SHORT)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The long run, uninterrupted, in one process."""
    return _baseline(tmp_path_factory, LONG)


@pytest.mark.torchrun
def test_grid_split_over_two_processes_gives_one_process_bytes(tmp_path, solo):
    duo = two_processes(SHORT, tmp_path / "duo")
    assert duo.returncode == 0, duo.stderr
    assert_same_bytes(solo, tmp_path / "duo")
    cfg = json.loads((tmp_path / "duo" / "train_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["parallel"] == "grid" and cfg["device"] == "cpu"
    # Each process really held only its share (read from its state): 64 on rank 0, the rest on 1.
    assert cfg["sizes_by_rank"] == [[64], [16, 32]]
    assert json.loads((solo / "train_config.json").read_text())["world_size"] == 1
    assert "rank 1: dictionary sizes [16, 32]" in duo.stdout
    assert duo.stdout.count("wrote ") == 1  # rank 0 alone reports


@pytest.mark.torchrun
def test_data_parallel_equals_one_process_within_float_tolerance(tmp_path, solo):
    duo = two_processes(SHORT + ["--parallel", "data"], tmp_path / "duo")
    assert duo.returncode == 0, duo.stderr
    wa, wb = weights(solo), weights(tmp_path / "duo")
    for name in wa:
        for k in wa[name]:
            torch.testing.assert_close(wa[name][k], wb[name][k], rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "duo" / "train_config.json").read_text())
    assert cfg["parallel"] == "data" and cfg["sizes_by_rank"] == [[16, 32, 64], [16, 32, 64]]
    # Dead counters see the whole batch (firing summed over ranks), not one rank's half.
    solo_rows = (solo / "summary.csv").read_text().splitlines()
    duo_rows = (tmp_path / "duo" / "summary.csv").read_text().splitlines()
    dead = solo_rows[0].split(",").index("dead")
    assert [r.split(",")[dead] for r in solo_rows[1:]] == [r.split(",")[dead] for r in duo_rows[1:]]


@pytest.mark.torchrun
def test_data_parallel_needs_a_batch_divisible_by_the_processes(tmp_path):
    run = two_processes(
        TOY + ["--steps", "10", "--batch-size", "63", "--parallel", "data"], tmp_path / "odd"
    )
    assert run.returncode != 0 and "divisible" in run.stderr


def _killed_after_first_checkpoint(cmd: list[str], out: Path) -> int:
    """Start ``cmd``, SIGKILL it and every process below it once a checkpoint is on disk (as a
    crash of the machine would); the checkpoint's step."""
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    state = out / "checkpoint" / "state.json"
    kill_when(state.exists, proc, "checkpoint", poll=0.05)
    meta = read_checkpoint_meta(out / "checkpoint")  # finishes a swap the kill interrupted
    assert meta is not None, proc.stderr.read()
    return meta["step"]


@pytest.mark.torchrun
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_run_killed_under_one_world_size_resumes_under_another_bit_identically(
    tmp_path, straight, first, then
):
    out = tmp_path / "resumed"
    start = (
        torchrun_cmd(LONG, out)
        if first == 2
        else [sys.executable, "-m", "unsuperpose", *LONG, "--out", str(out)]
    )
    step = _killed_after_first_checkpoint(start, out)
    assert 0 < step < 800
    finish = two_processes(LONG, out) if then == 2 else one_process(LONG, out)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming from the checkpoint at step {step:,}" in finish.stdout
    assert_same_bytes(out, straight)


@pytest.mark.torchrun
def test_a_data_parallel_run_killed_between_two_logs_resumes_to_the_same_history(tmp_path):
    """Logged every 25 steps, checkpointed every 30: the training scalars summed since the last
    log are in the checkpoint, as the whole batch's (each rank sums only its slice)."""
    args = TOY + ["--steps", "400", "--checkpoint-every", "30", "--parallel", "data"]
    straight = two_processes(args, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "resumed"
    step = _killed_after_first_checkpoint(torchrun_cmd(args, out), out)
    assert 0 < step < 400  # 30, 60, 90, 120: between two logs (150 and 300 would be on one)
    finish = two_processes(args, out)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming from the checkpoint at step {step:,}" in finish.stdout
    assert_same_bytes(out, tmp_path / "straight")


# -- devices: the device-agnostic code, run on the CPU here (and on a GPU when one is there) ------


def test_device_flags_resolve_and_refuse_clearly():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto").type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    with pytest.raises(UserError, match="cpu, cuda"):
        distributed.resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no usable CUDA GPU"):
            distributed.resolve_device("cuda")


def test_cuda_on_a_machine_without_one_is_one_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = one_process(TOY + ["--steps", "10", "--device", "cuda"], tmp_path / "x")
    assert (
        run.returncode == 2 and "no usable CUDA GPU" in run.stderr and "Traceback" not in run.stderr
    )


def _toy_state(device: str, data_rng: str | None = None):
    source = ToySource(ToyConfig(h=16, G=32, seed=3), device=device, rng_device=data_rng)
    cfg = SAETrainConfig(
        sparsity=[1e-4, 1e-3],
        dict_sizes=[16, 32],
        steps=60,
        batch_size=64,
        log_every=20,
        dead_window=20,
        resample_every=20,
        resample_until=1.0,
    )
    return source, new_state(source, cfg, device=device)


def test_a_checkpoint_loads_onto_the_state_device_and_continues_exactly(tmp_path, one_torch_thread):
    source, state = _toy_state("cpu")
    train_steps(state, source, until=30, progress=False)
    save_checkpoint(state, tmp_path / "ckpt")
    train_steps(state, source, progress=False)
    target = "cuda" if torch.cuda.is_available() else "cpu"
    source2, resumed = _toy_state(target, data_rng="cpu")
    load_checkpoint(resumed, tmp_path / "ckpt", source.describe())
    assert resumed.step == 30 and all(g.W_dec.device.type == target for g in resumed.groups)
    train_steps(resumed, source2, progress=False)
    for a, b in zip(state.groups, resumed.groups):
        if target == "cpu":
            assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.since_fired, b.since_fired)
        else:
            torch.testing.assert_close(a.W_dec, b.W_dec.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_runs_of_the_same_seed_agree_to_float_tolerance():
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_src, cpu = _toy_state("cpu")
    gpu_src, gpu = _toy_state("cuda", data_rng="cpu")
    train_steps(cpu, cpu_src, progress=False)
    train_steps(gpu, gpu_src, progress=False)
    for a, b in zip(cpu.groups, gpu.groups):
        torch.testing.assert_close(a.W_dec, b.W_dec.cpu(), rtol=1e-3, atol=1e-4)


def test_toy_batches_on_another_generator_are_another_dataset():
    cpu = ToySource(ToyConfig(h=16, G=32), device="cpu")
    moved = ToySource(ToyConfig(h=16, G=32), device="cpu", rng_device="cpu")
    assert cpu.describe() == moved.describe()
    assert torch.equal(next(cpu.batches(8)), next(moved.batches(8)))
    if torch.cuda.is_available():
        gpu = ToySource(ToyConfig(h=16, G=32), device="cuda")
        assert gpu.describe()["fingerprint"] != cpu.describe()["fingerprint"]
