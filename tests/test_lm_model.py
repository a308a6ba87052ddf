import json
import os

import pytest
import torch

from unsuperpose.lm import (
    LMConfig,
    ModelError,
    adopt_model,
    build_model,
    check_n_ctx,
    load_bridge,
    load_model,
    model_info,
    save_model,
    token_blocks,
)
from unsuperpose.lm.model import WEIGHTS


@pytest.fixture(scope="module")
def tokens(tiny_corpus):
    return torch.from_numpy(token_blocks(tiny_corpus, 32, "all").blocks[:3].astype("int64"))


def test_transformers_and_transformerlens_agree(tiny_lm_dir, tokens):
    hf = load_model(tiny_lm_dir)
    assert not hf.training and next(hf.parameters()).dtype == torch.float32
    bridge = load_bridge(tiny_lm_dir)
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        tl_logits, cache = bridge.run_with_cache(
            tokens, names_filter=lambda n: n.endswith("mlp.hook_post")
        )
    assert torch.allclose(hf_logits, tl_logits, atol=1e-5, rtol=0)

    captured = {}
    layer = 1
    mlp = hf.transformer.h[layer].mlp
    handle = mlp.act.register_forward_hook(lambda mod, inp, out: captured.setdefault("act", out))
    with torch.no_grad():
        hf(tokens)
    handle.remove()
    assert captured["act"].shape[-1] == 64
    assert torch.allclose(
        cache[f"blocks.{layer}.mlp.hook_post"], captured["act"], atol=1e-6, rtol=0
    )


def test_same_seed_same_weights_and_info(tiny_lm_dir, tiny_corpus):
    a = build_model(LMConfig(n_layer=1, d_model=8, n_head=2, d_mlp=16, n_ctx=8), seed=1)
    b = build_model(LMConfig(n_layer=1, d_model=8, n_head=2, d_mlp=16, n_ctx=8), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    info = model_info(tiny_lm_dir)
    assert (info["n_layer"], info["d_model"], info["d_mlp"], info["n_ctx"], info["vocab_size"]) == (
        3,
        16,
        64,
        32,
        50257,
    )
    assert len(info["weights_sha256"]) == 64
    assert info["corpus"] == {**tiny_corpus.__dict__}
    assert (tiny_lm_dir / "tokenizer.json").is_file()


def test_interrupted_save_never_looks_complete(tmp_path, tiny_lm_dir, monkeypatch):
    import unsuperpose.lm.model as model_module

    model = load_model(tiny_lm_dir)
    out = save_model(model, tmp_path / "m")
    before = model_info(out)["weights_sha256"]

    def broken(*a, **k):
        raise OSError("disk full")

    # Failing while the new files are written: the previous model is untouched.
    monkeypatch.setattr(model_module, "write_json_atomic", broken)
    with pytest.raises(OSError):
        save_model(model, out)
    assert model_info(out)["weights_sha256"] == before and not list(out.glob(".saving-*"))
    monkeypatch.undo()

    # Failing while they are moved into place: no weights file, so the directory reads as
    # unfinished.
    real_replace = os.replace
    monkeypatch.setattr(
        model_module.os,
        "replace",
        lambda src, dst: broken() if str(dst).endswith(WEIGHTS) else real_replace(src, dst),
    )
    with pytest.raises(OSError):
        save_model(model, out)
    monkeypatch.undo()
    assert not (out / WEIGHTS).exists() and not list(out.glob(".saving-*"))
    with pytest.raises(ModelError, match="unfinished"):
        load_model(out)


@pytest.mark.slow
def test_adopting_a_plain_hf_model(tmp_path, tiny_lm_dir):
    plain = tmp_path / "plain"
    load_model(tiny_lm_dir).save_pretrained(plain)  # no tokenizer, no lm_config.json
    out = adopt_model(plain, tmp_path / "adopted")
    info = model_info(out)
    assert info["corpus"] is None and info["extra"]["adopted_from"] == str(plain.resolve())
    assert torch.equal(
        load_model(out).transformer.wte.weight, load_model(tiny_lm_dir).transformer.wte.weight
    )


def test_not_a_bridged_causal_lm_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(
        json.dumps({"model_type": "bert", "vocab_size": 30522})
    )
    with pytest.raises(
        ModelError,
        match="'bert' .* not a causal LM that TransformerLens 4 can bridge; supported: .*GPTNeoX",
    ):
        adopt_model(tmp_path / "bert", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_n_ctx_beyond_positions(tiny_lm_dir):
    check_n_ctx(model_info(tiny_lm_dir), 32)
    with pytest.raises(
        ModelError, match="n_ctx=33 is larger than the model's 32 positions; use n_ctx=32"
    ):
        check_n_ctx(model_info(tiny_lm_dir), 33)
