"""Shared fixtures: a tiny local corpus and a tiny random GPT-2-style model, both session-scoped.

Tests never touch the network, W&B or the real corpus's 1M tokens: the hub is forced offline,
W&B is disabled, and the token cache lives in a throwaway folder for the whole session.
"""

from __future__ import annotations

import json
import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("UNSUPERPOSE_CACHE", tempfile.mkdtemp(prefix="unsuperpose-test-cache-"))

import pytest  # noqa: E402

_ANIMALS = ["cat", "dog", "owl", "fox", "bee", "elk", "yak", "emu"]
_PLACES = ["garden", "forest", "river", "meadow", "village", "harbour"]


def tiny_documents(n: int = 40) -> list[str]:
    """Short, varied, deterministic documents with enough regularity for a model to learn from."""
    docs = []
    for i in range(n):
        a, b = _ANIMALS[i % len(_ANIMALS)], _ANIMALS[(3 * i + 1) % len(_ANIMALS)]
        p = _PLACES[i % len(_PLACES)]
        docs.append(
            f"Document {i}. The {a} walked to the {p}. The {b} followed the {a} to the {p} "
            f"and they rested there for {i % 7 + 2} hours. The {p} was quiet."
        )
    return docs


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """CorpusConfig of 40 short documents in a local .jsonl (20% held out for validation)."""
    from unsuperpose.lm import CorpusConfig

    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    path.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in tiny_documents()), encoding="utf-8"
    )
    return CorpusConfig(corpus=str(path), val_fraction=0.2, seed=0)


TINY_LM = dict(preset="custom", n_layer=3, d_model=16, n_head=4, d_mlp=64, n_ctx=32)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_corpus):
    """A randomly initialised (untrained) 3-layer GPT-2-style model saved with save_model."""
    from unsuperpose.lm import LMConfig, build_model, save_model

    out = tmp_path_factory.mktemp("lm") / "tiny"
    cfg = LMConfig(**TINY_LM)
    save_model(build_model(cfg, seed=0), out, corpus=tiny_corpus, lm_config=cfg)
    return out


@pytest.fixture(scope="session")
def analyze_runs(tmp_path_factory, tiny_lm_dir, tiny_corpus):
    """A runs/ tree as the pipeline leaves it, tiny: a store of the tiny LM's layer-1 MLP
    (runs/acts/tiny/layer1.zarr), a 2 x 2 SAE grid on it (runs/sae/tiny/layer1/1x+2x/) and a
    2 x 2 toy grid (runs/toy/), each written by the same code the commands use."""
    import torch

    from unsuperpose.analyze import grid_figures, score_grid
    from unsuperpose.harvest import ActivationStore, HarvestConfig, harvest
    from unsuperpose.lm import load_bridge, model_info, token_blocks
    from unsuperpose.toy import ToyConfig, ToySource
    from unsuperpose.train import SAETrainConfig, run_grid

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread hand-offs cost more than they save
    runs = tmp_path_factory.mktemp("runs")
    info = model_info(tiny_lm_dir)
    blocks = token_blocks(tiny_corpus, 32)
    [path] = harvest(
        load_bridge(tiny_lm_dir),
        blocks.blocks,
        runs / "acts" / "tiny",
        HarvestConfig(layer="1", chunk_rows=256, batch_size=8),
        model_dir=info["path"],
        weights_sha256=info["weights_sha256"],
        corpus_fingerprint=blocks.fingerprint,
        heldout=blocks.val_mask,
        progress=False,
    )
    store = ActivationStore(path)
    assert store.describe()["heldout_rule"] == "documents"
    cfg = SAETrainConfig(
        sparsity=[1e-3, 1e-2],
        dict_sizes=[64, 128],
        steps=60,
        batch_size=64,
        log_every=20,
        dead_window=20,
        resample_every=0,
    )
    from unsuperpose.analyze.splice_grid import splice_columns

    run_grid(
        store,
        cfg,
        runs / "sae" / "tiny" / "layer1" / "1x+2x",
        size_labels={64: "1x", 128: "2x"},
        size_base=64,
        size_axis="x d",
        progress=False,
        run_name="test",
        source_info=store.describe(),
        more_scores=lambda state: splice_columns(state.saes(), store, 64, progress=False),
        score=score_grid,
        figures=grid_figures,
    )
    toy = ToySource(ToyConfig(h=16, G=32, k=2, decay=0.95, seed=0))
    cfg = SAETrainConfig(
        sparsity=[1e-3, 1e-2],
        dict_sizes=[32, 64],
        steps=100,
        batch_size=64,
        log_every=50,
        dead_window=20,
    )
    run_grid(
        toy,
        cfg,
        runs / "toy",
        size_labels={32: "1x", 64: "2x"},
        size_base=32,
        size_axis="x G",
        ground_truth=toy.features,
        progress=False,
        run_name="toy",
        source_info=toy.describe(),
        score=score_grid,
        figures=grid_figures,
    )
    torch.set_num_threads(threads)
    return runs


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls: thread hand-offs cost more than they save."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
