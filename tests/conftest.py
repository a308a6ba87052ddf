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
        docs.append(f"Document {i}. The {a} walked to the {p}. The {b} followed the {a} to the {p} "
                    f"and they rested there for {i % 7 + 2} hours. The {p} was quiet.")
    return docs


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """CorpusConfig of 40 short documents in a local .jsonl (20% held out for validation)."""
    from unsuperpose.lm import CorpusConfig

    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_documents()), encoding="utf-8")
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
