"""The harvest reads hook points on the plain HF model (harvest/direct.py), not through the
TransformerLens bridge: tiny random GPT-2 and Llama (RMSNorm, gated MLP) models built from
configs, checked against forward hooks on an independently loaded copy of each, batch by batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unsuperpose.harvest import ActivationStore, HarvestConfig, harvest, loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_CTX, VOCAB, BATCH = 32, 100, 4
SOURCE = {"model_dir": "tiny", "weights_sha256": "w0", "corpus_fingerprint": "c0"}


def _save(arch: str, path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from unsuperpose.lm import get_tokenizer

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=3, n_embd=16, n_inner=64, n_head=2, n_positions=N_CTX, vocab_size=VOCAB
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=N_CTX,
        )
        model = LlamaForCausalLM(cfg)
    model.eval().save_pretrained(path)
    get_tokenizer().save_pretrained(path)  # the bridge boots with a tokenizer; any will do here
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(arch, tmp_path_factory) -> Path:
    return _save(arch, tmp_path_factory.mktemp(arch))


@pytest.fixture(scope="module")
def bridge(model_dir):
    from unsuperpose.lm import load_bridge

    return load_bridge(model_dir)


@pytest.fixture(scope="module")
def blocks() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (10, N_CTX)).astype(np.uint16)


def run(bridge, blocks, out, hook, layer="1", **kw) -> Path:
    [path] = harvest(
        bridge,
        blocks,
        out,
        HarvestConfig(layer=layer, hook=hook, batch_size=BATCH, chunk_rows=64, **kw),
        progress=False,
        **SOURCE,
    )
    return path


def hf_reference(
    model_dir: Path, arch: str, blocks: np.ndarray, layer: int, precision="fp32", attn="sdpa"
):
    """{"mlp": input of layer's down projection, "resid": the layer's output}, (rows, d), by
    forward hooks on a plain HF model loaded on its own, over the harvest's own batches."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    ).eval()
    block = model.transformer.h[layer] if arch == "gpt2" else model.model.layers[layer]
    down = block.mlp.c_proj if arch == "gpt2" else block.mlp.down_proj
    got: dict[str, list] = {"mlp": [], "resid": []}
    hooks = [
        down.register_forward_pre_hook(lambda m, a: got["mlp"].append(a[0])),
        block.register_forward_hook(
            lambda m, i, o: got["resid"].append(o[0] if isinstance(o, tuple) else o)
        ),
    ]
    cast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )
    with torch.no_grad(), cast:
        for b in range(0, len(blocks), BATCH):
            model(torch.from_numpy(blocks[b : b + BATCH].astype(np.int64)))
    for h in hooks:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).float() for k, v in got.items()}


def stored(path: Path) -> torch.Tensor:
    s = ActivationStore(path)
    return torch.from_numpy(s.read_rows(0, s.rows).astype(np.float32))


@pytest.mark.parametrize(
    "hook,key",
    [("blocks.{layer}.mlp.hook_post", "mlp"), ("blocks.{layer}.hook_resid_post", "resid")],
)
def test_rows_are_an_independent_hf_hook_rounded_to_bfloat16_bit_for_bit(
    arch, model_dir, bridge, blocks, tmp_path, hook, key
):
    path = run(bridge, blocks, tmp_path, hook)
    assert zarr.open_group(path).attrs["forward"] == "hf"
    want = hf_reference(model_dir, arch, blocks, 1)[key]
    got = stored(path)
    assert got.shape == want.shape == (blocks.size, want.shape[1])
    # The same modules (HF's default attention) on the same batches in fp32: only the store's
    # one bf16 rounding remains.
    assert torch.equal(got, want.to(torch.bfloat16).float())
    # Eager attention (the bridge's, and load_model's) differs only by float rounding.
    eager = hf_reference(model_dir, arch, blocks, 1, attn="eager")[key]
    torch.testing.assert_close(got, eager, rtol=2**-8, atol=1e-6)


def test_a_bf16_forward_equals_the_hf_hook_under_autocast(
    arch, model_dir, bridge, blocks, tmp_path
):
    path = run(bridge, blocks[:4], tmp_path, "blocks.{layer}.mlp.hook_post", precision="bf16")
    assert zarr.open_group(path).attrs["precision"] == "bf16"
    want = hf_reference(model_dir, arch, blocks[:4], 1, precision="bf16")["mlp"]
    torch.testing.assert_close(stored(path), want, rtol=2**-7, atol=1e-3)


def test_nothing_past_the_harvested_hook_is_computed(arch, bridge, blocks, tmp_path):
    """Harvesting layer 1's mlp.hook_post runs layer 1's MLP input projection but not its down
    projection, nor layer 2, nor the unembedding (hooks on the HF modules the bridge wraps)."""
    ran = []

    def watch(name):
        def fn(module, args, out):  # after the module: it really ran
            if args[0].shape[1] == N_CTX:  # the harvest's batches, not the few-token probe
                ran.append(name)

        return fn

    modules = {"unembed": bridge.unembed.original_component}
    for L in range(3):
        mlp = bridge.blocks[L].mlp
        modules[f"{L}.in"] = getattr(mlp, "gate" if arch == "llama" else "in").original_component
        modules[f"{L}.out"] = mlp.out.original_component
    handles = [m.register_forward_hook(watch(n)) for n, m in modules.items()]
    try:
        run(bridge, blocks, tmp_path, "blocks.{layer}.mlp.hook_post")
    finally:
        for h in handles:
            h.remove()
    assert set(ran) == {"0.in", "0.out", "1.in"}


def test_a_hook_the_plain_model_lacks_is_read_through_the_bridge(bridge, blocks, tmp_path):
    """ln2.hook_normalized exists only inside the bridge's norm: harvested as before."""
    hook = "blocks.1.ln2.hook_normalized"
    path = run(bridge, blocks, tmp_path, hook)
    assert zarr.open_group(path).attrs["forward"] == "bridge"
    with torch.no_grad():
        _, cache = bridge.run_with_cache(
            torch.from_numpy(blocks[:BATCH].astype(np.int64)), names_filter=[hook]
        )
    want = cache[hook].reshape(-1, cache[hook].shape[-1])
    assert torch.equal(stored(path)[: len(want)], want.to(torch.bfloat16).float())


def test_when_the_plain_model_disagrees_with_the_bridge_the_bridge_wins(
    bridge, blocks, tmp_path, monkeypatch, capsys
):
    """A hook name whose HF module does not give the bridge's value (a future adapter, say) is
    caught on the probe's tokens, and the whole harvest goes through the bridge."""
    real = loop.DirectForward.run

    def off(self, ids, sites):
        return {h: x + 1.0 for h, x in real(self, ids, sites).items()}

    monkeypatch.setattr(loop.DirectForward, "run", off)
    path = run(bridge, blocks, tmp_path, "blocks.{layer}.mlp.hook_post")
    assert "differ from the bridge's" in capsys.readouterr().out
    assert zarr.open_group(path).attrs["forward"] == "bridge"
    with torch.no_grad():
        hook = "blocks.1.mlp.hook_post"
        _, cache = bridge.run_with_cache(
            torch.from_numpy(blocks[:BATCH].astype(np.int64)), names_filter=[hook]
        )
    want = cache[hook].reshape(-1, cache[hook].shape[-1])
    assert torch.equal(stored(path)[: len(want)], want.to(torch.bfloat16).float())


def test_the_view_shares_the_weights_and_leaves_the_bridge_as_it_was(bridge, blocks, tmp_path):
    ids = torch.from_numpy(blocks[:2].astype(np.int64))
    with torch.no_grad():
        before = bridge(ids)
    view = loop.DirectForward(bridge)
    assert view.config._attn_implementation == "sdpa"
    assert bridge.original_model.config._attn_implementation == "eager"  # the bridge's choice
    weights = {p.data_ptr() for p in bridge.original_model.parameters()}
    assert {p.data_ptr() for p in view.model.parameters()} <= weights  # nothing copied

    def hooks():  # transformers installs hooks of its own on a model's first call: keep those
        return [(list(m._forward_hooks), list(m._forward_pre_hooks)) for m in view.model.modules()]

    installed = hooks()
    run(bridge, blocks, tmp_path, "blocks.{layer}.mlp.hook_post")
    with torch.no_grad():
        assert torch.equal(bridge(ids), before)
    assert hooks() == installed
