"""Every registered architecture through the whole grid path: train, evaluate, save, load back,
resume bit-identically, the CLI's flags and folder names, and torchrun.

The per-architecture maths is checked against plain references in test_families_*.py; this file
checks that the seam carries every family the same way.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import (
    FAMILIES,
    SAETrainConfig,
    evaluate,
    load_dictionary,
    new_state,
    save_grid,
    train_steps,
)
from unsuperpose.train.checkpoint import Checkpointer, load_checkpoint
from unsuperpose.train.io import load_saes
from unsuperpose.train.layout import dict_dirname

SMALL = ToyConfig(h=16, G=32, k=3, decay=0.95, seed=0)
KNOBS = {"relu": [1e-3, 1e-2], "topk": [2, 4], "batchtopk": [2, 4], "matryoshka": [2, 4]}
KNOBS["jumprelu"] = [1e-3, 1e-2]


def config(arch: str, **kw) -> SAETrainConfig:
    base = dict(
        arch=arch,
        dict_sizes=[16, 32],
        steps=40,
        batch_size=64,
        dead_window=5,
        log_every=10,
        sparsity=KNOBS[arch],
    )
    if arch == "jumprelu":  # thresholds that move in 40 steps (see commands/toy.py)
        base["jumprelu"] = {"bandwidth": 0.05, "init_threshold": 0.05}
    base.update(kw)
    cfg = SAETrainConfig(**{k: v for k, v in base.items() if k != "jumprelu"})
    if "jumprelu" in base:
        from unsuperpose.train.config import JumpReLUOptions

        cfg.jumprelu = JumpReLUOptions(**base["jumprelu"])
    return cfg


def test_every_architecture_is_registered_with_its_knob():
    assert {a: f.knob.name for a, f in FAMILIES.items()} == {
        "relu": "l1",
        "topk": "k",
        "batchtopk": "k",
        "matryoshka": "k",
        "jumprelu": "l0_coef",
        # the fitted baselines (tests/test_baselines.py)
        "neurons": "k",
        "pca": "k",
        "ica": "k",
        "random": "k",
        "sparse-coding": "l1",
    }
    trained = {a for a, f in FAMILIES.items() if not f.fitted}
    assert trained == {"relu", "topk", "batchtopk", "jumprelu", "matryoshka"}


@pytest.mark.parametrize("arch", sorted(KNOBS))
def test_grid_trains_evaluates_saves_and_loads_back(arch, tmp_path):
    src = ToySource(SMALL)
    cfg = config(arch)
    state = train_steps(new_state(src, cfg), src, progress=False)
    metrics = evaluate(state, src)
    assert set(metrics) == {(v, n) for v in KNOBS[arch] for n in (16, 32)}
    for m in metrics.values():
        assert m["heldout_rows"] > 0 and 0 <= m["heldout_fvu"] < 2 and m["heldout_l0"] > 0
    rows = save_grid(state, metrics, tmp_path)
    knob = FAMILIES[arch].knob.name
    with open(tmp_path / "summary.csv", newline="") as fh:
        written = list(csv.DictReader(fh))
    assert {(r["arch"], r["sparsity_name"]) for r in written} == {(arch, knob)}
    assert ("l1" in written[0]) == (arch == "relu")
    assert len(rows) == 4
    for v in KNOBS[arch]:
        assert (tmp_path / "saes" / dict_dirname(arch, knob, v, 16) / "sae.safetensors").exists()

    loaded = load_saes(tmp_path)
    assert set(loaded) == set(metrics)
    x = next(src.batches(64, seed=99))
    for g in state.groups:
        codes, x_hat = g.reconstruct(x)
        for s, v in enumerate(g.values):
            d = loaded[(v, g.n)]
            assert d.arch == arch
            torch.testing.assert_close(d.encode(x), codes[:, s], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(d.decode(codes[:, s]), x_hat[s], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(d.atoms(), g.dictionaries()[s], atol=1e-6, rtol=1e-5)
            one = load_dictionary(tmp_path / "saes" / dict_dirname(arch, knob, v, g.n))
            assert type(one) is type(d)


@pytest.mark.parametrize("arch", sorted(KNOBS))
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(arch, tmp_path):
    src = ToySource(SMALL)
    cfg = config(arch, resample_every=10 if arch == "relu" else 0)
    whole = train_steps(new_state(src, cfg), src, progress=False)
    part = new_state(src, cfg)
    ckpt = Checkpointer(tmp_path / "ckpt", every=0)

    def stop_at_23(state):
        ckpt.stop_requested = state.step == 23
        ckpt(state)

    with pytest.raises(KeyboardInterrupt):
        train_steps(part, src, on_step=stop_at_23, progress=False)
    resumed = new_state(src, cfg)
    load_checkpoint(resumed, tmp_path / "ckpt")
    assert resumed.step == 23
    train_steps(resumed, src, progress=False)
    for a, b in zip(whole.groups, resumed.groups, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:  # parameters, dead counters and buffers (BatchTopK's threshold)
            assert torch.equal(sa[name], sb[name]), name
    opt_a, opt_b = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    for pid in opt_a:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[pid][moment], opt_b[pid][moment]), (pid, moment)


def _toy(args, out, **kw):
    return subprocess.run(
        [sys.executable, "-m", "unsuperpose", "toy", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=kw.get("env"),
    )


TOY_ARGS = ["--h", "16", "--g", "32", "--steps", "30", "--batch-size", "64", "--no-progress"]
TOY_ARGS += ["--wandb", "disabled", "--dict-sizes", "1x"]


@pytest.mark.slow
def test_toy_cli_trains_another_architecture_and_refuses_a_foreign_knob(tmp_path):
    run = _toy([*TOY_ARGS, "--arch", "topk", "--topk", "2,3"], tmp_path / "t")
    assert run.returncode == 0, run.stderr
    assert "2 k x 1 sizes = 2 topk SAEs" in run.stdout
    assert (tmp_path / "t" / "saes" / "topk-n32-k_2" / "sae.safetensors").exists()
    with open(tmp_path / "t" / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["arch"], r["sparsity_name"], r["sparsity"]) for r in rows] == [
        ("topk", "k", "2"),
        ("topk", "k", "3"),
    ]
    codes = load_dictionary(tmp_path / "t" / "saes" / "topk-n32-k_2").encode(torch.randn(50, 16))
    assert int((codes > 0).sum(dim=1).max()) <= 2

    bad = _toy([*TOY_ARGS, "--arch", "topk", "--l1", "1e-3"], tmp_path / "bad")
    assert bad.returncode == 2
    assert "--l1 is not a knob of --arch topk; its knob is --topk" in bad.stderr
    assert not (tmp_path / "bad" / "summary.csv").exists()


# torchrun: every architecture goes through the same trainer paths (grid split: whole sizes per
# rank; data parallel: the trainer reduces what the groups return). TopK and JumpReLU codes are
# row-local, so data parallelism must equal one process within float tolerance; AuxK normalises
# by each rank's own residual variance and BatchTopK selects within each rank's slice (their
# docstrings), so for them only the grid split is exact.
DIST_TOY = ["toy", *TOY_ARGS[:-2], "--dict-sizes", "1/2x,1x", "--steps", "60", "--log-every", "20"]


@pytest.mark.torchrun
@pytest.mark.parametrize(
    "arch,knob", [("topk", ["--topk", "2,4"]), ("batchtopk", ["--topk", "2,4"])]
)
def test_grid_split_over_two_processes_gives_one_process_bytes(arch, knob, tmp_path):
    from test_train_distributed import assert_same_bytes, one_process, two_processes

    args = [*DIST_TOY, "--arch", arch, *knob]
    solo = one_process(args, tmp_path / "solo")
    assert solo.returncode == 0, solo.stderr
    duo = two_processes(args, tmp_path / "duo")
    assert duo.returncode == 0, duo.stderr
    assert_same_bytes(tmp_path / "solo", tmp_path / "duo")


@pytest.mark.torchrun
@pytest.mark.parametrize(
    "arch,knob",
    [("topk", ["--topk", "2,4", "--auxk-coef", "0"]), ("jumprelu", ["--l0-coef", "1e-3,1e-2"])],
)
def test_data_parallel_equals_one_process_within_float_tolerance(arch, knob, tmp_path):
    from test_train_distributed import one_process, two_processes, weights

    args = [*DIST_TOY, "--arch", arch, *knob]
    solo = one_process(args, tmp_path / "solo")
    assert solo.returncode == 0, solo.stderr
    duo = two_processes([*args, "--parallel", "data"], tmp_path / "duo")
    assert duo.returncode == 0, duo.stderr
    wa, wb = weights(tmp_path / "solo"), weights(tmp_path / "duo")
    assert wa and wa.keys() == wb.keys()
    for name in wa:
        for k in wa[name]:
            torch.testing.assert_close(wa[name][k], wb[name][k], rtol=1e-4, atol=1e-5)
