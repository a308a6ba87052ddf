import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_LM
from unsuperpose.lm import (
    LMConfig,
    ModelError,
    RunExists,
    TrainLMConfig,
    build_model,
    evaluate,
    preset,
    token_blocks,
    train_lm,
)
from unsuperpose.lm.checkpoint import CHECKPOINT
from unsuperpose.lm.schedule import BlockOrder, lr_at


def _cfgs(tmp_path, **train):
    lm = LMConfig(**{**TINY_LM, "dropout": 0.1})
    knobs = dict(
        tokens=8 * 4 * 32,
        batch_size=4,
        micro_batch=2,
        lr=1e-2,
        warmup_fraction=0.2,
        eval_every=2,
        eval_blocks=2,
        checkpoint_every=3,
        threads=1,
        wandb="disabled",
        token_cache=str(tmp_path / "cache"),
    )
    return lm, TrainLMConfig(**{**knobs, **train})


def _log(out):
    import json

    return [
        r
        for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
        if "train/loss" in r
    ]


def test_a_few_steps_lower_the_loss(tmp_path, tiny_corpus):
    lm, train = _cfgs(tmp_path)
    val = token_blocks(tiny_corpus, lm.n_ctx, "val", cache_dir=train.token_cache)
    before = evaluate(build_model(lm, train.seed), val.blocks, micro_batch=4, chunk=256)
    result = train_lm(lm, train, tiny_corpus, tmp_path / "run", progress=False)
    assert result["finished"] and result["val_loss"] < before - 0.5
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (
        tmp_path / "run" / CHECKPOINT
    ).exists()
    losses = [r["train/loss"] for r in _log(tmp_path / "run")]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_corpus):
    lm, train = _cfgs(tmp_path)
    train_lm(lm, train, tiny_corpus, tmp_path / "whole", progress=False)

    part = train_lm(
        lm,
        dataclasses.replace(train, stop_at_step=5),
        tiny_corpus,
        tmp_path / "split",
        progress=False,
    )
    assert part == {"step": 5, "steps": 8, "finished": False}
    assert (tmp_path / "split" / CHECKPOINT).is_file() and not (
        tmp_path / "split" / "model.safetensors"
    ).exists()
    train_lm(lm, train, tiny_corpus, tmp_path / "split", progress=False)

    whole = load_file(tmp_path / "whole" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    assert [r["train/loss"] for r in _log(tmp_path / "whole")] == [
        r["train/loss"] for r in _log(tmp_path / "split")
    ]


def test_refuses_to_mix_runs_or_overwrite(tmp_path, tiny_corpus):
    lm, train = _cfgs(tmp_path)
    train_lm(
        lm,
        dataclasses.replace(train, stop_at_step=2),
        tiny_corpus,
        tmp_path / "run",
        progress=False,
    )
    with pytest.raises(RunExists, match=r"different run \(differs in: train.lr\).*overwrite=True"):
        train_lm(
            lm, dataclasses.replace(train, lr=1e-3), tiny_corpus, tmp_path / "run", progress=False
        )
    train_lm(lm, train, tiny_corpus, tmp_path / "run", progress=False)
    with pytest.raises(
        RunExists, match="already holds a trained model; train it again with overwrite=True"
    ):
        train_lm(lm, train, tiny_corpus, tmp_path / "run", progress=False)


def test_schedule_warms_up_then_decays():
    cfg = TrainLMConfig(lr=1.0, warmup_fraction=0.01, min_lr_fraction=0.1)
    lrs = [lr_at(s, 1000, cfg) for s in range(1000)]
    assert (
        lrs[0] == pytest.approx(0.1)
        and lrs[9] == pytest.approx(1.0)
        and lrs[10] == pytest.approx(1.0)
    )
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(
        0.1, abs=1e-4
    )


def test_block_order_visits_every_block_once_per_epoch():
    order = BlockOrder(10, 4, seed=0)
    seen = np.concatenate([order.batch(s) for s in range(5)])  # 20 positions = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])
    assert np.array_equal(BlockOrder(10, 4, seed=0).batch(3), order.batch(3))


def test_presets():
    assert preset("tiny")[0].d_model == 16 and preset("small")[0].d_mlp == 1024
    assert preset("report")[1].batch_size == 256
    with pytest.raises(
        ValueError, match="unknown preset 'huge'; choose one of tiny, small, report"
    ):
        preset("huge")


def test_fine_tuning_cannot_exceed_positions(tmp_path, tiny_corpus, tiny_lm_dir):
    lm, train = _cfgs(tmp_path)
    with pytest.raises(ModelError, match="larger than the model's 32 positions"):
        train_lm(
            dataclasses.replace(lm, n_ctx=64),
            train,
            tiny_corpus,
            tmp_path / "ft",
            init_from=tiny_lm_dir,
            progress=False,
        )
    assert not (tmp_path / "ft" / "model.safetensors").exists()


def test_training_on_from_a_saved_model(tmp_path, tiny_corpus, tiny_lm_dir):
    from unsuperpose.lm import model_info, model_lm_config

    _, train = _cfgs(tmp_path, tokens=2 * 4 * 32)
    lm = model_lm_config(tiny_lm_dir)
    result = train_lm(
        lm, train, tiny_corpus, tmp_path / "ft", init_from=tiny_lm_dir, progress=False
    )
    info = model_info(tmp_path / "ft")
    assert result["finished"] and info["extra"]["init_from"] == str(tiny_lm_dir.resolve())
    assert info["weights_sha256"] != model_info(tiny_lm_dir)["weights_sha256"]
