"""Reading dictionary sets back and merging them; the errors a user sees for bad folders."""

import os
import time

import pytest
import torch

from unsuperpose.analyze.collect import GridError, collect_lm, collect_toy
from unsuperpose.train import SAE


def sae_dirname(l1: float, n: int) -> str:
    return f"n{n}-l1_{l1:g}"  # how runs before architectures named them: still read


def make_set(
    folder, d, cells, *, steps, batch=64, l1_norm="sum", dead_window=1000, source=None, **training
):
    """A dictionary set on disk without training: random SAEs with made-up final metrics."""
    source = source or {
        "kind": "activation_store",
        "path": "/x/layer1.zarr",
        "fingerprint": "abc",
        "hook": "blocks.1.mlp.hook_post",
        "weights_sha256": "w1",
        "rows": 1000,
    }
    for i, (l1, n) in enumerate(cells):
        g = torch.Generator().manual_seed(i)
        sae = SAE(
            d,
            n,
            params={
                "W_enc": torch.randn(d, n, generator=g),
                "b_enc": torch.zeros(n),
                "W_dec": torch.randn(n, d, generator=g),
            },
        )
        metrics = {
            "l1": l1,
            "dict_size": n,
            "steps": steps,
            "samples": steps * batch,
            "heldout_mse": 0.1 + i,
            "heldout_l1_loss": 1.0 + i,
            "heldout_mean_l1": 3.0,
            "dead": i,
            "heldout_fvu": 0.5,
            "heldout_l0": 4.0,
        }
        sae.save(
            folder / "saes" / sae_dirname(l1, n),
            {
                "l1": l1,
                "l1_norm": l1_norm,
                "metrics": metrics,
                "source": source,
                "training": {
                    "steps": steps,
                    "batch_size": batch,
                    "l1_norm": l1_norm,
                    "dead_window": dead_window,
                    "lr": 3e-3,
                    "tied": False,
                    "decoder_init": "orthogonal",
                    "resample_every": 0,
                    **training,
                },
            },
        )
    (folder / "summary.csv").write_text("l1\n")
    return folder


def test_sets_merge_into_one_grid_and_the_later_duplicate_wins(tmp_path):
    base = tmp_path / "sae" / "tiny" / "layer1"
    make_set(base / "1x+2x", 8, [(1e-3, 8), (1e-3, 16)], steps=100)
    time.sleep(0.01)
    make_set(base / "2x+4x", 8, [(1e-3, 16), (1e-3, 32)], steps=100)
    grid = collect_lm(tmp_path, "tiny", 1)
    assert sorted(grid.cells) == [(1e-3, 8), (1e-3, 16), (1e-3, 32)]
    assert grid.cells[(1e-3, 16)].set_dir.name == "2x+4x"
    assert grid.cells[(1e-3, 8)].set_dir.name == "1x+2x"
    assert len(grid.notes) == 1 and "using 2x+4x" in grid.notes[0]
    assert grid.d == 8 and grid.source["path"] == "/x/layer1.zarr" and grid.dead_window == 1000
    rows = grid.rows()
    assert [r["dict_size"] for r in rows] == [8, 16, 32] and all(r["l1"] == 1e-3 for r in rows)
    assert grid.dictionaries()[(1e-3, 32)].shape == (32, 8)


def test_sets_trained_for_different_numbers_of_steps_are_refused_never_pooled(tmp_path):
    # Every diagnostic compares a cell with its neighbours: a 300-step cell beside 1,500-step ones
    # reads as "more dead latents" or "a basin" that only training length made.
    base = tmp_path / "sae" / "tiny" / "layer1"
    make_set(base / "short", 8, [(1e-3, 8), (1e-3, 16)], steps=300)
    make_set(base / "long", 8, [(1e-3, 32)], steps=1500, lr=1e-3)
    with pytest.raises(GridError) as err:
        collect_lm(tmp_path, "tiny", 1)
    msg = str(err.value)
    assert "long vs short" in msg or "short vs long" in msg
    assert "steps: 1,500 vs 300" in msg or "steps: 300 vs 1,500" in msg
    assert "lr: 0.001 vs 0.003" in msg or "lr: 0.003 vs 0.001" in msg
    assert "name its sets, e.g. sets='" in msg and "--" not in msg  # the CLI adds its flags
    # naming one experiment reads it alone
    assert sorted(collect_lm(tmp_path, "tiny", 1, sets=["short"]).cells) == [(1e-3, 8), (1e-3, 16)]
    with pytest.raises(GridError, match="no dictionary set named nope .*long, short"):
        collect_lm(tmp_path, "tiny", 1, sets=["nope"])


def test_of_two_equally_long_runs_the_later_one_wins(tmp_path):
    base = tmp_path / "sae" / "tiny" / "layer1"
    old = make_set(base / "b-old", 8, [(1e-3, 8)], steps=100)
    new = make_set(base / "a-new", 8, [(1e-3, 8)], steps=100)
    cfg = old / "saes" / sae_dirname(1e-3, 8) / "config.json"
    os.utime(cfg, (time.time() - 100, time.time() - 100))
    assert collect_lm(tmp_path, "tiny", 1).cells[(1e-3, 8)].set_dir == new


def test_no_dictionaries_is_one_clear_error_naming_the_fix(tmp_path):
    with pytest.raises(GridError, match=r"no dictionaries found .*make train LM=tiny LAYER=1"):
        collect_lm(tmp_path, "tiny", 1)
    with pytest.raises(GridError, match="make toy"):
        collect_toy(tmp_path / "toy")


def test_sets_of_different_widths_are_refused(tmp_path):
    base = tmp_path / "sae" / "tiny" / "layer1"
    make_set(base / "1x", 8, [(1e-3, 8)], steps=10)
    make_set(base / "stray", 16, [(1e-3, 16)], steps=10)
    with pytest.raises(GridError, match="different input widths .*stray"):
        collect_lm(tmp_path, "tiny", 1)


def test_grid_wide_measures_are_recomputed_over_the_merged_sets(tmp_path):
    from unsuperpose.analyze.metrics import mmcs
    from unsuperpose.analyze.report import rescore

    base = tmp_path / "sae" / "tiny" / "layer1"
    make_set(base / "1x", 8, [(1e-3, 8)], steps=10)
    make_set(base / "4x", 8, [(1e-3, 32)], steps=10)
    grid = collect_lm(tmp_path, "tiny", 1)
    rescore(grid)
    d = grid.dictionaries()
    # Alone, the 1x set has nothing larger to compare with; merged, it has the 4x one.
    assert grid.cells[(1e-3, 8)].metrics["mmcs_larger"] == pytest.approx(
        mmcs(d[(1e-3, 8)], d[(1e-3, 32)])
    )
    ssll = grid.values("ssll")
    assert set(ssll) == {(1e-3, 8), (1e-3, 32)} and sum(ssll.values()) == pytest.approx(0, abs=1e-9)


def test_a_set_still_training_is_named_in_the_notes(tmp_path):
    base = tmp_path / "sae" / "tiny" / "layer1"
    make_set(base / "1x", 8, [(1e-3, 8)], steps=10)
    (base / "8x" / "checkpoint").mkdir(parents=True)
    grid = collect_lm(tmp_path, "tiny", 1)
    assert (
        list(grid.cells) == [(1e-3, 8)]
        and "still training" in grid.notes[0]
        and "8x" in grid.notes[0]
    )


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(l1_norm="per_latent"), "l1_norm"),
        (dict(batch=256), "batch_size"),
        (dict(resample_every=250), "resample_every"),
        (dict(tied=True), "tied"),
        (dict(decoder_init="data"), "decoder_init"),
        (dict(dead_window=100), "dead_window"),
        (
            dict(
                source={
                    "kind": "activation_store",
                    "path": "/y/layer1.zarr",
                    "fingerprint": "def",
                    "hook": "blocks.1.mlp.hook_post",
                    "weights_sha256": "w2",
                    "rows": 1000,
                }
            ),
            "weights_sha256",
        ),
        (
            dict(
                source={
                    "kind": "activation_store",
                    "path": "/x/layer1.zarr",
                    "fingerprint": "ghi",
                    "hook": "blocks.1.hook_resid_post",
                    "weights_sha256": "w1",
                    "rows": 1000,
                }
            ),
            "hook",
        ),
    ],
)
def test_sets_made_otherwise_are_refused_not_merged(tmp_path, change, word):
    # Another L1 convention changes what the L1 axis means by a factor of n; another store, hook
    # or dead window makes the cells different experiments: SSLL must not z-score across them.
    base = tmp_path / "sae" / "tiny" / "layer1"
    make_set(base / "1x", 8, [(1e-3, 8)], steps=100)
    make_set(base / "2x", 8, [(1e-3, 16)], steps=100, **change)
    with pytest.raises(GridError, match=rf"not one grid.*{word}"):
        collect_lm(tmp_path, "tiny", 1)
