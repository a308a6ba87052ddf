"""Beyond GPT-2: tiny random GPT-NeoX (Pythia's architecture) and Llama models, each saved with a
tokenizer trained here on the test documents, go through adopt -> harvest -> train -> report,
splice and the feature browser, offline. What is checked against something independent: the
stored activations against forward hooks on the plain HF model, the spliced-in loss against a
hand-written HF hook, the packed tokens against the tokenizer's own ids, the browser's text
against the documents."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import tiny_documents
from unsuperpose.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_CTX = 64  # the models' max_position_embeddings: harvest's default block length
ARCHS = {
    # arch: (d_mlp, what mlp.hook_post is: the input of the MLP's down projection)
    "neox": 64,  # act(dense_h_to_4h(x))
    "llama": 48,  # act(gate_proj(x)) * up_proj(x)
}


def _tokenizer(arch: str):
    """A byte-level BPE with <|endoftext|> (Pythia's kind) or a SentencePiece-style BPE that adds
    <s> itself and ends with </s> (Llama's kind), trained on the test documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    docs = tiny_documents()
    if arch == "neox":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(
            docs,
            trainers.BpeTrainer(
                vocab_size=300,
                special_tokens=["<|endoftext|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        )
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(
        docs, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _model(arch: str, vocab: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Embeddings wider than the tokenizer, as Pythia's are (50,304 rows for 50,277 tokens).
    common = dict(
        vocab_size=vocab + 20,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=ARCHS[arch],
        max_position_embeddings=N_CTX,
    )
    if arch == "neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, bos_token_id=0, eos_token_id=0)).eval()
    return LlamaForCausalLM(
        LlamaConfig(**common, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    ).eval()


def _parts(model, arch: str, layer: int):
    """(decoder layer, its MLP's down projection, the gate projection or None) of the HF model."""
    layers = model.gpt_neox.layers if arch == "neox" else model.model.layers
    mlp = layers[layer].mlp
    return (
        layers[layer],
        (mlp.dense_4h_to_h if arch == "neox" else mlp.down_proj),
        getattr(mlp, "gate_proj", None),
    )


@pytest.fixture(scope="module", params=list(ARCHS))
def pipeline(request, tmp_path_factory, tiny_corpus):
    """One architecture taken through the pipeline the way a user would, with the CLI."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    raw = root / "raw"
    tok = _tokenizer(arch)
    _model(arch, len(tok)).save_pretrained(raw)
    tok.save_pretrained(raw)
    lm = root / "lm"
    corpus = ["--corpus", tiny_corpus.corpus, "--val-fraction", "0.2"]
    assert main(["lm", "adopt", "--from", str(raw), "--out", str(lm), *corpus]) == 0
    acts = root / "runs" / "acts" / arch
    for hook in ("blocks.{layer}.mlp.hook_post", "blocks.{layer}.hook_resid_post"):
        assert (
            main(
                [
                    "harvest",
                    "--lm",
                    str(lm),
                    "--out",
                    str(acts),
                    "--layer",
                    "1",
                    "--hook",
                    hook,
                    "--batch-size",
                    "4",
                    "--chunk-rows",
                    "256",
                    "--no-progress",
                ]
            )
            == 0
        )
    sae = root / "runs" / "sae" / arch / "layer1"
    assert (
        main(
            [
                "train",
                "--store",
                str(acts / "layer1.zarr"),
                "--out",
                str(sae),
                "--dict-sizes",
                "1x,2x",
                "--l1",
                "1e-3,1e-2",
                "--steps",
                "40",
                "--batch-size",
                "64",
                "--dead-window",
                "20",
                "--splice-tokens",
                "100",
                "--wandb",
                "disabled",
                "--no-progress",
            ]
        )
        == 0
    )
    return {
        "arch": arch,
        "raw": raw,
        "lm": lm,
        "acts": acts,
        "sae": sae / "1x+2x",
        "runs": root / "runs",
        "root": root,
    }


def test_adopt_and_info_take_the_model_and_its_own_tokenizer(pipeline, capsys):
    from unsuperpose.lm import load_model

    arch, lm = pipeline["arch"], pipeline["lm"]
    assert main(["lm", "info", str(lm)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["n_layer"], info["d_model"], info["d_mlp"], info["n_ctx"]) == (
        {"neox": "gpt_neox", "llama": "llama"}[arch],
        2,
        32,
        ARCHS[arch],
        N_CTX,
    )
    tok = info["tokenizer"]
    assert not tok["tag"].startswith("gpt2") and tok["vocab_size"] < info["vocab_size"]
    # Pythia appends <|endoftext|> and prepends nothing; a Llama tokenizer adds <s> itself, ends
    # with </s>.
    assert (tok["bos"], tok["eos"]) == {
        "neox": ([], ["<|endoftext|>"]),
        "llama": (["<s>"], ["</s>"]),
    }[arch]
    assert info["corpus"]["val_fraction"] == 0.2
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert torch.equal(load_model(lm)(ids).logits, load_model(pipeline["raw"])(ids).logits)


def test_documents_are_packed_with_the_models_own_tokens_and_conventions(
    pipeline, tiny_corpus, tmp_path
):
    from unsuperpose.lm import iter_documents, model_tokenizer, token_blocks

    tok = model_tokenizer(pipeline["lm"])
    hf = tok.hf
    expected = []
    for doc in iter_documents(tiny_corpus):
        with_specials = hf(doc)["input_ids"]  # what the tokenizer itself adds (Llama's <s>)
        if with_specials[-1] != hf.eos_token_id:
            with_specials = with_specials + [hf.eos_token_id]
        expected += with_specials
    blocks = token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path, tokenizer=tok)
    assert blocks.blocks.dtype == np.uint16 and blocks.tokenizer == tok.tag
    assert np.array_equal(blocks.blocks.ravel(), np.asarray(expected)[: blocks.blocks.size])
    gpt2 = token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path)
    assert gpt2.fingerprint != blocks.fingerprint and len({p.name for p in tmp_path.iterdir()}) == 2


def test_lm_tokens_takes_a_models_tokenizer(pipeline, tiny_corpus, tmp_path, capsys):
    from unsuperpose.lm import model_tokenizer

    assert (
        main(
            [
                "lm",
                "tokens",
                "--corpus",
                tiny_corpus.corpus,
                "--val-fraction",
                "0.2",
                "--n-ctx",
                "16",
                "--cache-dir",
                str(tmp_path),
                "--tokenizer",
                str(pipeline["lm"]),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (
        report["all"]["tokenizer"] == model_tokenizer(pipeline["lm"]).tag
        and report["all"]["n_documents"] == 40
    )


def test_a_tokenizer_opening_with_its_end_of_text_token_separates_documents_once(tmp_path):
    """Pythia's tokenizer may be saved to add <|endoftext|> in front of a text as well: packing
    must still put one <|endoftext|> between documents, not two."""
    from tokenizers import processors

    from unsuperpose.lm import load_tokenizer

    tok = _tokenizer("neox")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)]
    )
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.hf("cat")["input_ids"][0] == eot  # it does add one in front
    assert (loaded.bos, loaded.eos) == ((), (eot,))
    [ids] = loaded.encode_documents(["The cat"])
    assert ids[-1] == eot and eot not in ids[:-1]


def test_gpt2_token_caches_and_fingerprints_keep_their_identity(tiny_lm_dir, tiny_corpus, tmp_path):
    """A GPT-2 model's tokenizer (the files save_model wrote) is GPT-2's BPE under its old tag, so
    caches and stores made before other tokenizers existed still match: the fingerprint below is
    computed the way the pipeline always computed it."""
    from unsuperpose.lm import model_tokenizer, token_blocks
    from unsuperpose.lm.corpus import corpus_identity

    tok = model_tokenizer(tiny_lm_dir)
    assert (tok.tag, tok.bos, tok.eos) == ("gpt2-bpe-50257", (), (50_256,))
    blocks = token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path, tokenizer=tok)
    assert (
        blocks.fingerprint == token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path).fingerprint
    )

    def digest(obj):
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

    identity = {"corpus": corpus_identity(tiny_corpus), "tokenizer": "gpt2-bpe-50257"}
    stream = np.load(tmp_path / digest(identity)[:24] / "stream.npy")
    assert stream.dtype == np.uint16
    assert blocks.fingerprint == digest(
        {
            "identity": identity,
            "split": "all",
            "n_ctx": 16,
            "tokens": hashlib.sha256(stream.tobytes()).hexdigest(),
        }
    )


def test_stored_activations_equal_forward_hooks_on_the_hf_model(pipeline):
    from unsuperpose.harvest import ActivationStore
    from unsuperpose.lm import load_model, model_tokenizer, token_blocks

    arch, lm = pipeline["arch"], pipeline["lm"]
    mlp = ActivationStore(pipeline["acts"] / "layer1.zarr")
    resid = ActivationStore(pipeline["acts"] / "blocks.1.hook_resid_post.zarr")
    assert (mlp.d, resid.d) == (ARCHS[arch], 32)  # widths come from the model
    assert mlp.metadata["corpus"]["tokenizer"] == model_tokenizer(lm).tag
    model = load_model(pipeline["raw"])
    layer, down, gate = _parts(model, arch, 1)
    got = {}
    hooks = [
        down.register_forward_pre_hook(lambda m, a: got.__setitem__("mlp", a[0])),
        layer.register_forward_hook(
            lambda m, i, o: got.__setitem__("resid", o[0] if isinstance(o, tuple) else o)
        ),
    ]
    if gate is not None:
        hooks.append(gate.register_forward_hook(lambda m, i, o: got.__setitem__("gate", o)))
    blocks = token_blocks(_store_corpus(mlp), N_CTX, "all", tokenizer=model_tokenizer(lm)).blocks[
        :3
    ]
    with torch.no_grad():
        model(torch.from_numpy(blocks.astype(np.int64)))
    for h in hooks:
        h.remove()
    n = blocks.size
    tokens = np.asarray(mlp.tokens()[:n])
    assert np.array_equal(tokens, blocks.ravel())
    for store, ref in ((mlp, got["mlp"]), (resid, got["resid"])):
        stored = torch.from_numpy(store.read_rows(0, n).astype(np.float32))
        want = ref.reshape(n, -1).to(torch.bfloat16).float()
        torch.testing.assert_close(stored, want, rtol=1e-2, atol=1e-3)
    if gate is not None:  # the gated MLP's hook_post is act(gate) * up, not act(gate) alone
        alone = torch.nn.functional.silu(got["gate"]).reshape(n, -1)
        assert (torch.from_numpy(mlp.read_rows(0, n).astype(np.float32)) - alone).abs().max() > 0.05


def test_the_mlp_hooks_are_what_the_readme_says(pipeline):
    """hook_pre: the up (NeoX) or gate (Llama) projection before the activation; hook_pre_linear
    (Llama only): the up projection; hook_post: the down projection's input, act(pre) * pre_linear
    for the gated MLP. Checked against forward hooks on the HF modules themselves."""
    from unsuperpose.lm import load_bridge, load_model

    arch = pipeline["arch"]
    model = load_model(pipeline["raw"])
    mlp = _parts(model, arch, 0)[0].mlp
    first, act = (mlp.dense_h_to_4h, mlp.act) if arch == "neox" else (mlp.gate_proj, mlp.act_fn)
    got = {}
    hooks = [
        first.register_forward_hook(lambda m, i, o: got.__setitem__("pre", o)),
        act.register_forward_hook(lambda m, i, o: got.__setitem__("act", o)),
    ]
    if arch == "llama":
        hooks.append(mlp.up_proj.register_forward_hook(lambda m, i, o: got.__setitem__("up", o)))
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        model(ids)
        _, cache = load_bridge(pipeline["lm"]).run_with_cache(
            ids, names_filter=lambda n: n.startswith("blocks.0.mlp.")
        )
    for h in hooks:
        h.remove()
    torch.testing.assert_close(cache["blocks.0.mlp.hook_pre"], got["pre"])
    if arch == "llama":
        torch.testing.assert_close(cache["blocks.0.mlp.hook_pre_linear"], got["up"])
        torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], got["act"] * got["up"])
    else:
        assert "blocks.0.mlp.hook_pre_linear" not in cache
        torch.testing.assert_close(cache["blocks.0.mlp.hook_post"], got["act"])


def _store_corpus(store):
    from unsuperpose.lm import CorpusConfig

    corpus = {k: v for k, v in store.metadata["corpus"].items() if k != "tokenizer"}
    return CorpusConfig(**corpus)


def test_spliced_ce_equals_a_hand_written_hook_on_the_down_projection(pipeline):
    from unsuperpose.analyze.splice import splice_eval
    from unsuperpose.analyze.splice_grid import validation_blocks
    from unsuperpose.lm import load_bridge, load_model, model_tokenizer
    from unsuperpose.train import SAE

    arch, lm = pipeline["arch"], pipeline["lm"]
    tok = model_tokenizer(lm)
    blocks, _ = validation_blocks(lm, N_CTX, 150)
    stream = np.concatenate(blocks)
    ends = np.flatnonzero(stream[:-1] == tok.eos[0])
    assert len(ends) >= 2
    if tok.bos:  # Llama: every document starts with <s>
        assert blocks[0][0] == tok.bos[0] and (stream[ends + 1] == tok.bos[0]).all()
    else:  # Pythia: documents are only separated by <|endoftext|>
        assert (stream[ends + 1] != tok.eos[0]).all()
    sae = SAE.load(sorted((pipeline["sae"] / "saes").iterdir())[0]).eval()

    def recon(x):
        with torch.no_grad():
            return sae(x.reshape(-1, x.shape[-1]))[0].reshape(x.shape)

    r = splice_eval(
        load_bridge(lm),
        "blocks.1.mlp.hook_post",
        blocks,
        {"sae": recon},
        mean=torch.zeros(ARCHS[arch]),
        progress=False,
    )
    model = load_model(lm)
    _, down, _ = _parts(model, arch, 1)

    def ce(replace=None):
        handle = down.register_forward_pre_hook(lambda m, a: (replace(a[0]),)) if replace else None
        total = n = 0
        with torch.no_grad():
            for b in blocks:
                ids = torch.from_numpy(b)[None]
                logits = model(ids).logits[0, :-1]
                total += float(
                    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                )
                n += len(b) - 1
        if handle:
            handle.remove()
        return total / n

    assert r["ce_clean"] == pytest.approx(ce(), abs=1e-5)
    assert r["ce_zero"] == pytest.approx(ce(torch.zeros_like), abs=1e-5)
    assert r["saes"]["sae"]["ce_sae"] == pytest.approx(ce(recon), abs=1e-5)
    assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-4


def test_train_splices_and_the_report_and_browser_show_the_models_text(pipeline, tiny_corpus):
    from unsuperpose.harvest import ActivationStore
    from unsuperpose.lm import iter_documents

    arch = pipeline["arch"]
    rows = list(csv.DictReader(open(pipeline["sae"] / "summary.csv")))
    assert len(rows) == 4 and all(np.isfinite(float(r["ce_clean"])) for r in rows)
    assert all(np.isfinite(float(r["delta_ce"])) for r in rows)
    out = pipeline["root"] / "report"
    assert (
        main(
            [
                "analyze",
                "report",
                "--runs",
                str(pipeline["runs"]),
                "--lm",
                arch,
                "--layer",
                "1",
                "--out",
                str(out),
                "--top",
                "3",
                "--wandb",
                "disabled",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "index.html").is_file()
    pages = list(out.rglob("neurons.html"))
    assert pages, "the report built no feature browser"
    html = pages[0].read_text()
    # Phrases of the documents: GPT-2's BPE would decode these small ids as other text entirely.
    assert "walked to the" in html and "followed the" in html

    from unsuperpose.harvest import store_decoder

    store = ActivationStore(pipeline["acts"] / "layer1.zarr")
    decode = store_decoder(store)
    first = next(iter(iter_documents(tiny_corpus)))
    text = decode([int(t) for t in store.tokens()[: 2 * N_CTX]])
    assert text.startswith({"neox": first, "llama": "<s> " + first}[arch])


def test_splice_command_packs_a_text_file_with_the_models_bos_and_eos(pipeline, tmp_path):
    from unsuperpose.lm import model_tokenizer

    text = tmp_path / "docs.txt"
    text.write_text("The cat walked to the river.\n\nThe owl rested in the forest for 3 hours.\n")
    out = tmp_path / "s" / "splice.json"
    assert (
        main(
            [
                "analyze",
                "splice",
                "--dictionary",
                str(pipeline["sae"]),
                "--corpus",
                str(text),
                "--out",
                str(out.parent),
                "--no-progress",
            ]
        )
        == 0
    )
    tok = model_tokenizer(pipeline["lm"])
    n = sum(
        len(ids)
        for ids in tok.encode_documents([d.strip() for d in text.read_text().split("\n\n")])
    )
    assert json.loads(out.read_text())["tokens"] == n - 1
    assert len(tok.bos) == (pipeline["arch"] == "llama")


def test_hook_and_layer_errors_name_what_the_bridge_offers(pipeline, capsys):
    lm, acts = str(pipeline["lm"]), str(pipeline["root"] / "bad")
    assert (
        main(
            [
                "harvest",
                "--lm",
                lm,
                "--out",
                acts,
                "--hook",
                "blocks.{layer}.mlp.hook_postt",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no hook point 'blocks.1.mlp.hook_postt'" in err and "layers are 0..1" in err
    assert "(--hook 'blocks.{layer}.mlp.hook_postt')" in err
    for name in (
        "blocks.{layer}.mlp.hook_post",
        "blocks.{layer}.hook_resid_post",
        "blocks.{layer}.hook_attn_out",
    ):
        assert name in err
    # GPT-NeoX runs attention and MLP in parallel: no residual stream between them to offer.
    assert ("blocks.{layer}.hook_resid_mid" in err) == (pipeline["arch"] == "llama")
    assert main(["harvest", "--lm", lm, "--out", acts, "--layer", "5", "--no-progress"]) == 2
    assert "error: --layer 5: this model has layers 0..1" in capsys.readouterr().err


def test_the_attention_output_is_harvested_where_the_bridge_offers_it(pipeline):
    from unsuperpose.harvest import ActivationStore

    out = pipeline["root"] / "attn"
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(pipeline["lm"]),
                "--out",
                str(out),
                "--layer",
                "0",
                "--hook",
                "blocks.{layer}.hook_attn_out",
                "--tokens",
                "256",
                "--no-progress",
            ]
        )
        == 0
    )
    store = ActivationStore(out / "blocks.0.hook_attn_out.zarr")
    assert store.d == 32 and store.rows == 256


def test_a_model_without_a_tokenizer_is_one_clear_error(tmp_path, tiny_corpus, capsys):
    _model("llama", 200).save_pretrained(tmp_path / "bare")
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(tmp_path / "bare"),
                "--out",
                str(tmp_path / "acts"),
                "--corpus",
                tiny_corpus.corpus,
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no tokenizer (tokenizer.json or tokenizer.model or vocab.json + merges.txt)" in err
    assert "save_pretrained" in err and not (tmp_path / "acts").exists()
    assert (
        main(["lm", "adopt", "--from", str(tmp_path / "bare"), "--out", str(tmp_path / "a")]) == 2
    )
    assert "no tokenizer" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_lm_train_from_a_non_gpt2_model_and_an_unreachable_hub_name_are_refused(
    pipeline, tmp_path, capsys
):
    assert main(["lm", "train", "--from", str(pipeline["lm"]), "--out", str(tmp_path / "t")]) == 2
    assert "trains GPT-2-style models only" in capsys.readouterr().err
    from unsuperpose.lm import ModelError, resolve_model

    with pytest.raises(ModelError, match="no such local directory, and no Hugging Face hub model"):
        resolve_model("unsuperpose-test/no-such-model")


def test_a_downloaded_model_is_harvested_as_it_is_and_spliced_on_its_stores_corpus(
    pipeline, tiny_corpus
):
    """No adopt: the directory as saved (no lm_config.json, no corpus of its own), with --corpus."""
    from unsuperpose.analyze.splice_grid import SpliceError, validation_blocks
    from unsuperpose.harvest import ActivationStore

    out = pipeline["root"] / "direct"
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(pipeline["raw"]),
                "--out",
                str(out),
                "--layer",
                "1",
                "--batch-size",
                "4",
                "--corpus",
                tiny_corpus.corpus,
                "--val-fraction",
                "0.2",
                "--no-progress",
            ]
        )
        == 0
    )
    direct, adopted = (
        ActivationStore(out / "layer1.zarr"),
        ActivationStore(pipeline["acts"] / "layer1.zarr"),
    )
    assert direct.metadata["corpus_fingerprint"] == adopted.metadata["corpus_fingerprint"]
    assert np.array_equal(
        direct.read_rows(0, direct.rows).view(np.uint16),
        adopted.read_rows(0, adopted.rows).view(np.uint16),
    )
    with pytest.raises(SpliceError, match="does not record the corpus"):
        validation_blocks(pipeline["raw"], N_CTX, 100)
    blocks, _ = validation_blocks(pipeline["raw"], N_CTX, 100, direct.provenance.corpus)
    want, _ = validation_blocks(pipeline["lm"], N_CTX, 100)
    assert all(np.array_equal(a, b) for a, b in zip(blocks, want)) and len(blocks) == len(want)


def test_a_hub_name_resolves_to_its_snapshot_and_is_harvested_from_there(
    pipeline, tiny_corpus, monkeypatch
):
    """What `harvest --lm EleutherAI/pythia-70m` does, with the download replaced by a folder."""
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.append((repo_id, allow_patterns))
        return str(pipeline["raw"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    from unsuperpose.lm import model_info

    assert model_info("someone/tiny-model")["path"] == str(pipeline["raw"].resolve())
    assert asked[0] == (
        "someone/tiny-model",
        ["*.json", "*.safetensors", "*.model", "*.txt"],
    )  # no .bin, no code
    out = pipeline["root"] / "hub"
    assert (
        main(
            [
                "harvest",
                "--lm",
                "someone/tiny-model",
                "--out",
                str(out),
                "--layer",
                "0",
                "--tokens",
                "128",
                "--corpus",
                tiny_corpus.corpus,
                "--no-progress",
            ]
        )
        == 0
    )
    from unsuperpose.harvest import ActivationStore

    assert ActivationStore(out / "layer0.zarr").metadata["model_dir"] == str(
        pipeline["raw"].resolve()
    )
