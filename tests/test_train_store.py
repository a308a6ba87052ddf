"""`unsuperpose train` on a Zarr store: same results as from RAM, exact resume, SAELens export,
and one clear error for each kind of bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_reference import assert_matches, train_alone
from unsuperpose.cli import main
from unsuperpose.harvest import ActivationStore, store
from unsuperpose.harvest.bf16 import BF16
from unsuperpose.harvest.writer import ChunkWriter
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import SAE, SAETrainConfig, new_state, train_steps
from unsuperpose.train.checkpoint import Checkpointer, load_checkpoint
from waiting import wait_until

TOY = ToyConfig(h=16, G=32, k=2, decay=0.95, seed=0)


def write_store(path: Path, x: np.ndarray, *, chunk: int = 256, upto: int | None = None) -> Path:
    """Rows ``x`` written through the harvest writer, as a harvest would; ``upto`` stops early."""
    rows, d = x.shape
    prov = store.Provenance(
        model_dir="toy",
        weights_sha256="none",
        hook="toy",
        layer=0,
        width=d,
        n_ctx=16,
        corpus_fingerprint=f"toy-{rows}-{d}",
    )
    group = store.create(path, prov, rows, chunk, batch_size=1)
    writer = ChunkWriter(group, 0, rows)
    end = rows if upto is None else upto
    writer.add(x[:end].astype(BF16), np.arange(end) % 97, np.arange(end) % 16)
    writer.close() if upto is None else writer.abort()
    return path


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    x = ToySource(TOY).sample(4096, seed=1)[0].numpy()
    return write_store(tmp_path_factory.mktemp("stores") / "toy.zarr", x)


def train_cli(store_path: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "train",
            "--store",
            str(store_path),
            "--out",
            str(out),
            "--dict-sizes",
            "1x,2x",
            "--l1",
            "1e-3,1e-2",
            "--steps",
            "40",
            "--batch-size",
            "64",
            "--log-every",
            "10",
            "--wandb",
            "disabled",
            "--no-progress",
            *extra,
        ]
    )


def test_grid_on_a_store_equals_each_sae_trained_alone(toy_store):
    src = ActivationStore(toy_store)
    cfg = SAETrainConfig(
        sparsity=[1e-3, 1e-2], dict_sizes=[16, 32], steps=30, batch_size=64, resample_every=0
    )
    state = train_steps(new_state(src, cfg), src, progress=False)
    for g in state.groups:
        for s, l1 in enumerate(g.l1):
            assert_matches(g.sae_params(s), train_alone(src, cfg, l1, g.n))


def test_train_cli_writes_grid_saelens_exports_and_figures(toy_store, tmp_path):
    assert train_cli(toy_store, tmp_path) == 0
    out = tmp_path / "1x+2x"
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {(r["l1"], r["dict_size"]) for r in rows} == {
        ("0.001", "16"),
        ("0.001", "32"),
        ("0.01", "16"),
        ("0.01", "32"),
    }
    for col in [
        "heldout_mse",
        "heldout_l1_loss",
        "heldout_l0",
        "heldout_fvu",
        "heldout_rows",
        "dead",
        "mmcs_larger",
        "ssll",
        "dict_ratio",
    ]:
        assert col in rows[0]
    # 16 chunks, none marked held out: the last quarter of them is (see harvest/heldout.py).
    assert {r["heldout_rows"] for r in rows} == {str(4 * 256)}
    assert "mmcs" not in rows[0]  # no ground truth on a store
    assert (out / "figures" / "heatmap_dead.png").exists()
    assert not (out / "checkpoint").exists()  # a finished run keeps dictionaries, not Adam state
    config = json.loads((out / "saes" / "relu-n16-l1_0.001" / "config.json").read_text())
    assert config["source"]["path"] == str(toy_store.resolve())


def test_saelens_export_encodes_and_decodes_like_ours(toy_store, tmp_path):
    assert train_cli(toy_store, tmp_path) == 0
    folder = tmp_path / "1x+2x" / "saelens" / "relu-n32-l1_0.01"
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 32 and cfg["architecture"] == "standard"
    assert w["W_enc"].shape == (16, 32) and w["b_enc"].shape == (32,)
    assert w["W_dec"].shape == (32, 16) and w["b_dec"].shape == (16,)
    ours = SAE.load(tmp_path / "1x+2x" / "saes" / "relu-n32-l1_0.01")
    x = torch.from_numpy(ToySource(TOY).sample(50, seed=5)[0].numpy())
    # SAELens "standard": encode ReLU((x - b_dec) @ W_enc + b_enc), decode f @ W_dec + b_dec
    f = torch.relu((x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(f, ours.encode(x))
    torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"], ours.decode(ours.encode(x)))


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(toy_store, tmp_path):
    src = ActivationStore(toy_store)
    cfg = SAETrainConfig(
        sparsity=[1e-3, 1e-2],
        dict_sizes=[16, 32],
        steps=40,
        batch_size=64,
        dead_window=5,
        resample_every=10,
    )
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
    for a, b in zip(whole.groups, resumed.groups):
        for name, t in a.named_parameters().items():
            assert torch.equal(t, b.named_parameters()[name]), name
        assert torch.equal(a.since_fired, b.since_fired)
    for (_pa, sa), (_pb, sb) in zip(whole.optimizer.state.items(), resumed.optimizer.state.items()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.slow
def test_sigterm_then_rerun_finishes_with_the_weights_of_an_uninterrupted_run(toy_store, tmp_path):
    args = [
        "--store",
        str(toy_store),
        "--dict-sizes",
        "2x",
        "--l1",
        "1e-3",
        "--steps",
        "1200",
        "--batch-size",
        "64",
        "--wandb",
        "disabled",
        "--no-progress",
        "--checkpoint-every",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unsuperpose", "train"]
    proc = subprocess.Popen(
        cmd + args + ["--out", str(tmp_path / "a")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "a" / "2x" / "log.jsonl"
    wait_until(
        lambda: log.exists() and log.read_text().count("\n") >= 2, proc, "two log lines", poll=0.1
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    meta = json.loads((tmp_path / "a" / "2x" / "checkpoint" / "state.json").read_text())
    assert 0 < meta["step"] < 1200
    done = subprocess.run(
        cmd + args + ["--out", str(tmp_path / "a")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "resuming from the checkpoint" in done.stdout, done.stderr
    straight = subprocess.run(
        cmd + args + ["--out", str(tmp_path / "b")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    a = load_file(str(tmp_path / "a" / "2x" / "saes" / "relu-n32-l1_0.001" / "sae.safetensors"))
    b = load_file(str(tmp_path / "b" / "2x" / "saes" / "relu-n32-l1_0.001" / "sae.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rerunning_a_finished_grid_does_nothing_and_other_settings_are_refused(
    toy_store, tmp_path, capsys
):
    assert train_cli(toy_store, tmp_path) == 0
    before = (tmp_path / "1x+2x" / "summary.csv").stat().st_mtime_ns
    assert train_cli(toy_store, tmp_path) == 0
    assert "already holds this grid" in capsys.readouterr().out
    assert (tmp_path / "1x+2x" / "summary.csv").stat().st_mtime_ns == before
    assert train_cli(toy_store, tmp_path, "--lr", "1e-2") == 2
    assert "--force" in capsys.readouterr().err
    assert train_cli(toy_store, tmp_path, "--lr", "1e-2", "--force") == 0


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--dict-sizes", "8y"], "8y"),
        (["--dict-sizes", "0x"], "0x"),
        (["--dict-sizes", "-1"], "-1"),
        (["--l1", "1e-3,abc"], "cannot parse L1"),
    ],
)
def test_malformed_flags_give_one_clear_error(toy_store, tmp_path, capsys, flags, words):
    code = main(
        ["train", "--store", str(toy_store), "--out", str(tmp_path), "--wandb", "disabled", *flags]
    )
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_missing_and_incomplete_stores_are_refused(tmp_path, capsys):
    assert main(["train", "--store", str(tmp_path / "nope.zarr"), "--out", str(tmp_path)]) == 2
    assert "harvest" in capsys.readouterr().err
    x = np.random.default_rng(0).normal(size=(1024, 8)).astype(np.float32)
    half = write_store(tmp_path / "half.zarr", x, upto=512)
    assert main(["train", "--store", str(half), "--out", str(tmp_path), "--wandb", "disabled"]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and "open it with --allow-incomplete" in err
    assert "allow_incomplete=True" not in err and "Traceback" not in err


def test_a_store_of_other_width_than_the_checkpoint_is_refused(toy_store, tmp_path, capsys):
    src = ActivationStore(toy_store)
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=40, batch_size=64)
    from unsuperpose.train.checkpoint import save_checkpoint

    state = new_state(src, cfg)
    save_checkpoint(state, tmp_path / "16" / "checkpoint")
    x = np.random.default_rng(0).normal(size=(1024, 8)).astype(np.float32)
    narrow = write_store(tmp_path / "narrow.zarr", x)
    code = main(
        [
            "train",
            "--store",
            str(narrow),
            "--out",
            str(tmp_path),
            "--dict-sizes",
            "16",
            "--l1",
            "1e-3",
            "--steps",
            "40",
            "--batch-size",
            "64",
            "--wandb",
            "disabled",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "width 16 in the checkpoint, 8 in the data" in err


def test_nan_in_the_data_stops_naming_the_sae_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(8192, 8)).astype(np.float32)
    clean = ActivationStore(write_store(tmp_path / "clean.zarr", x))
    # NaNs only in a chunk of the group the shuffled stream serves last in the first epoch, so
    # checkpoints are written before training meets them.
    last_group = clean.epoch_groups(seed=0, epoch=0, shuffle=True, buffer_chunks=8)[-1]
    c = int(last_group[0])
    x[c * 256 : (c + 1) * 256] = np.nan
    bad = write_store(tmp_path / "nan.zarr", x)
    code = main(
        [
            "train",
            "--store",
            str(bad),
            "--out",
            str(tmp_path),
            "--dict-sizes",
            "2x",
            "--l1",
            "1e-3",
            "--steps",
            "200",
            "--batch-size",
            "32",
            "--log-every",
            "5",
            "--checkpoint-every",
            "5",
            "--wandb",
            "disabled",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "L1 0.001 and 16 latents" in err and "non-finite" in err
    meta = json.loads((tmp_path / "2x" / "checkpoint" / "state.json").read_text())
    state = load_file(str(tmp_path / "2x" / "checkpoint" / "state.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in state.values()), meta["step"]


def test_a_checkpoint_is_never_written_from_non_finite_weights(toy_store, tmp_path):
    from unsuperpose.train import NonFiniteLoss

    src = ActivationStore(toy_store)
    state = new_state(
        src, SAETrainConfig(sparsity=[1e-3, 1e-2], dict_sizes=[16], steps=10, batch_size=64)
    )
    state.groups[0].W_dec[1, 3, 0] = float("nan")  # the SAE with L1 0.01
    with pytest.raises(NonFiniteLoss, match=r"L1 0\.01 and 16 latents"):
        Checkpointer(tmp_path / "ckpt", every=1)(state)
    assert not (tmp_path / "ckpt").exists()
