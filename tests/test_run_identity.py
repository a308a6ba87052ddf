"""A run's identity is its settings, its data and its budget: nothing resumes, skips or is passed
off across a mismatch. Also the flags' shown defaults, sizes and conventions."""

import json
import shutil

import pytest

from unsuperpose.cli import main
from unsuperpose.toy import ToyConfig, ToySource
from unsuperpose.train import SAETrainConfig, new_state, train_steps
from unsuperpose.train.checkpoint import (
    CheckpointMismatch,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from unsuperpose.train.grid import convert_l1
from unsuperpose.train.layout import CHECKPOINT_DIR

SMALL = [
    "--h",
    "16",
    "--g",
    "32",
    "--k",
    "2",
    "--batch-size",
    "32",
    "--l1",
    "1e-3",
    "--dict-sizes",
    "1x",
    "--eval-every",
    "100",
    "--wandb",
    "disabled",
    "--no-progress",
]


def toy(out, *extra):
    return main(["toy", "--out", str(out), *SMALL, *extra])


@pytest.mark.slow
def test_finished_toy_grid_with_other_data_is_refused_not_returned(tmp_path, capsys):
    out = tmp_path / "toy"
    assert toy(out, "--steps", "30") == 0
    assert toy(out, "--steps", "30") == 0  # the same run: nothing to do, said so
    assert "already holds this grid" in capsys.readouterr().out
    assert toy(out, "--steps", "30", "--k", "3") == 2  # other data: k 2 then, 3 now
    err = capsys.readouterr().err
    assert "made otherwise" in err and "'k': 2" not in err and "k: 2.0 then, 3.0 now" in err


def test_finished_grid_with_another_budget_is_refused(tmp_path, capsys):
    out = tmp_path / "toy"
    assert toy(out, "--steps", "30") == 0
    assert toy(out, "--steps", "60") == 2
    assert "steps: 30 then, 60 now" in capsys.readouterr().err


def test_a_checkpoint_never_resumes_on_other_data_or_budget(tmp_path):
    src = ToySource(ToyConfig(h=16, G=32, k=2, seed=0))
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=40, batch_size=32)
    state = new_state(src, cfg)
    train_steps(state, src, until=10, progress=False)
    save_checkpoint(state, tmp_path / CHECKPOINT_DIR)
    other = ToySource(ToyConfig(h=16, G=32, k=3, seed=0))  # same width, other data
    with pytest.raises(CheckpointMismatch, match="fingerprint"):
        load_checkpoint(new_state(other, cfg), tmp_path / CHECKPOINT_DIR, other.describe())
    longer = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=80, batch_size=32)
    with pytest.raises(CheckpointMismatch, match="steps: 40 then, 80 now"):
        load_checkpoint(new_state(src, longer), tmp_path / CHECKPOINT_DIR, src.describe())
    load_checkpoint(new_state(src, cfg), tmp_path / CHECKPOINT_DIR, src.describe())  # same: fine


def test_a_kill_between_the_two_renames_of_a_checkpoint_swap_is_recovered(tmp_path):
    src = ToySource(ToyConfig(h=16, G=32, k=2, seed=0))
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=40, batch_size=32)
    state = new_state(src, cfg)
    ckpt = tmp_path / CHECKPOINT_DIR
    train_steps(state, src, until=10, progress=False)
    save_checkpoint(state, ckpt)
    train_steps(state, src, until=20, progress=False)
    save_checkpoint(state, ckpt)
    # what a kill after `checkpoint -> .old` and before `.tmp -> checkpoint` leaves behind:
    newer = tmp_path / (CHECKPOINT_DIR + ".tmp")
    shutil.copytree(ckpt, newer)
    ckpt.rename(tmp_path / (CHECKPOINT_DIR + ".old"))
    assert read_checkpoint_meta(ckpt)["step"] == 20
    # only .old left (the kill came before .tmp was complete): the previous checkpoint
    shutil.rmtree(ckpt)
    save_checkpoint(state, ckpt)
    ckpt.rename(tmp_path / (CHECKPOINT_DIR + ".old"))
    (tmp_path / (CHECKPOINT_DIR + ".tmp")).mkdir()
    assert read_checkpoint_meta(ckpt)["step"] == 20


def test_help_shows_the_commands_own_defaults(capsys):
    for argv, want in (
        (["train", "--help"], ["optimizer steps (default: 10000)"]),
        (
            ["toy", "--help"],
            [
                "optimizer steps (default: 5000)",
                "minibatches (default: derived from the data",
                "183 for the default data and batch",
            ],
        ),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for w in want:
            assert w in text, (argv, w)


@pytest.mark.slow
def test_dict_ratios_reads_a_bare_number_as_a_ratio(tmp_path):
    out = tmp_path / "toy"
    assert (
        main(
            [
                "toy",
                "--out",
                str(out),
                "--h",
                "16",
                "--g",
                "32",
                "--k",
                "2",
                "--batch-size",
                "32",
                "--l1",
                "1e-3",
                "--dict-sizes",
                "1",
                "--steps",
                "20",
                "--eval-every",
                "100",
                "--wandb",
                "disabled",
                "--no-progress",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["dict_sizes"] == [32]  # 1 means 1x of G = 32, not one latent


def test_report_preset_converts_the_default_l1_values_to_its_convention(tmp_path, capsys):
    out = tmp_path / "toy"
    assert (
        main(
            [
                "toy",
                "--out",
                str(out),
                "--h",
                "16",
                "--g",
                "32",
                "--k",
                "2",
                "--steps",
                "20",
                "--batch-size",
                "32",
                "--dict-sizes",
                "1x",
                "--preset",
                "report",
                "--eval-every",
                "100",
                "--wandb",
                "disabled",
                "--no-progress",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "train_config.json").read_text())
    from unsuperpose.toy.defaults import DEFAULT_L1

    assert cfg["l1_norm"] == "per_latent"
    assert cfg["sparsity"] == pytest.approx([a * 32 for a in DEFAULT_L1], rel=1e-5)
    assert "converted" in capsys.readouterr().out
    assert convert_l1([0.1], have="per_latent", want="sum", base=10) == [0.01]


def test_a_checkpoint_of_another_version_is_refused_with_a_message(tmp_path):
    src = ToySource(ToyConfig(h=16, G=32, k=2, seed=0))
    cfg = SAETrainConfig(sparsity=[1e-3], dict_sizes=[16], steps=40, batch_size=32)
    state = new_state(src, cfg)
    save_checkpoint(state, tmp_path / CHECKPOINT_DIR)
    meta_path = tmp_path / CHECKPOINT_DIR / "state.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["eval_batches"] = 16  # a field this version no longer has
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match="another version"):
        load_checkpoint(new_state(src, cfg), tmp_path / CHECKPOINT_DIR, src.describe())
