"""The SAE spliced into the LM: the figures hold at their fixed points and equal a plain HF forward
hook doing the same replacement, computed with SAELens's formula."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from unsuperpose.analyze.splice import splice_eval
from unsuperpose.cli import main
from unsuperpose.lm import load_bridge, load_model, token_blocks
from unsuperpose.train import SAE
from unsuperpose.train.saelens import export_saelens

HOOK = "blocks.1.mlp.hook_post"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def val_blocks(tiny_corpus):
    return [np.asarray(b, dtype=np.int64) for b in token_blocks(tiny_corpus, 32, "val").blocks[:6]]


@pytest.fixture(scope="module")
def sae(analyze_runs):
    return SAE.load(next((analyze_runs / "sae" / "tiny" / "layer1" / "1x+2x" / "saes").iterdir()))


def test_an_exact_reconstruction_recovers_everything_and_zeros_nothing(tiny_lm_dir, val_blocks):
    r = splice_eval(
        load_bridge(tiny_lm_dir),
        HOOK,
        val_blocks,
        {"exact": lambda x: x, "zero": lambda x: torch.zeros_like(x)},
        mean=torch.full((64,), 0.1),
        progress=False,
    )
    assert r["tokens"] == sum(len(b) - 1 for b in val_blocks)
    assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-4  # the ablation moves the loss at all
    exact, zero = r["saes"]["exact"], r["saes"]["zero"]
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["delta_ce"] == pytest.approx(0.0, abs=1e-6) and exact["kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert exact["norm_ratio"] == pytest.approx(1.0) and exact[
        "relative_reconstruction_bias"
    ] == pytest.approx(1.0)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zero["kl"] == pytest.approx(r["kl_zero"], rel=1e-6) and zero[
        "kl_div_score"
    ] == pytest.approx(0.0, abs=1e-6)
    assert r["ce_mean"] != pytest.approx(r["ce_zero"])  # the mean ablation is its own baseline


def _hf_ce(model, blocks, replace=None):
    """Mean next-token CE of the plain HF model, with an optional forward hook on block 1's MLP
    activation (what TransformerLens calls blocks.1.mlp.hook_post)."""
    handle = None
    if replace is not None:
        handle = model.transformer.h[1].mlp.act.register_forward_hook(
            lambda m, i, out: replace(out)
        )
    try:
        total, n = 0.0, 0
        with torch.no_grad():
            for b in blocks:
                ids = torch.from_numpy(b)[None]
                logits = model(input_ids=ids).logits[0, :-1]
                total += float(
                    torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                )
                n += len(b) - 1
        return total / n
    finally:
        if handle is not None:
            handle.remove()


def test_spliced_ce_equals_a_hand_written_hf_hook_and_saelens_formula(
    tiny_lm_dir, val_blocks, sae, tmp_path
):
    r = splice_eval(
        load_bridge(tiny_lm_dir),
        HOOK,
        val_blocks,
        {"sae": lambda x: sae(x)[0]},
        mean=torch.zeros(64),
        progress=False,
    )
    # the same dictionary in SAELens's on-disk format, reconstructed with SAELens's standard math
    folder = export_saelens(sae, tmp_path / "saelens")
    w = load_file(str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"]

    def saelens_reconstruct(x):
        f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        return f @ w["W_dec"] + w["b_dec"]

    model = load_model(tiny_lm_dir).eval()
    clean = _hf_ce(model, val_blocks)
    spliced = _hf_ce(model, val_blocks, saelens_reconstruct)
    zero = _hf_ce(model, val_blocks, torch.zeros_like)
    assert r["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert r["saes"]["sae"]["ce_sae"] == pytest.approx(spliced, abs=1e-5)
    assert r["ce_zero"] == pytest.approx(zero, abs=1e-5)
    ce_loss_score = (zero - spliced) / (zero - clean)  # SAELens's ce_loss_score, on the means
    assert r["saes"]["sae"]["ce_loss_recovered"] == pytest.approx(ce_loss_score, abs=1e-3)
    assert r["saes"]["sae"]["delta_ce"] == pytest.approx(spliced - clean, abs=1e-5)


def test_splice_command_on_validation_documents_and_on_a_text_file(analyze_runs, tmp_path, capsys):
    grid = analyze_runs / "sae" / "tiny" / "layer1" / "1x+2x"
    out = tmp_path / "splice" / "splice.json"
    assert (
        main(
            [
                "analyze",
                "splice",
                "--dictionary",
                str(grid),
                "--tokens",
                "100",
                "--out",
                str(out.parent),
                "--no-progress",
            ]
        )
        == 0
    )
    rec = json.loads(out.read_text())
    for key in ("ce_clean", "ce_zero", "ce_mean", "tokens"):
        assert key in rec
    assert len(rec["saes"]) == 4 and rec["text"]["split"] == "val" and rec["tokens"] >= 100
    for r in rec["saes"].values():
        for key in (
            "ce_sae",
            "ce_loss_recovered",
            "ce_loss_recovered_mean",
            "delta_ce",
            "delta_ce_se",
            "kl",
            "norm_ratio",
            "relative_reconstruction_bias",
        ):
            if key == "relative_reconstruction_bias" and r["norm_ratio"] == 0:
                assert np.isnan(r[key])  # an SAE that outputs 0 has no bias to speak of
                continue
            assert np.isfinite(r[key]), key
    assert "recovered" in capsys.readouterr().out
    text = tmp_path / "docs.txt"
    text.write_text(
        "The cat sat on the mat.\n\nA second document, a little longer than the first one.\n"
    )
    out2 = tmp_path / "file" / "splice.json"
    assert (
        main(
            [
                "analyze",
                "splice",
                "--dictionary",
                str(grid / "saes" / "relu-n64-l1_0.001"),
                "--corpus",
                str(text),
                "--out",
                str(out2.parent),
                "--no-progress",
            ]
        )
        == 0
    )
    rec2 = json.loads(out2.read_text())
    from unsuperpose.lm import get_tokenizer

    n = sum(
        len(get_tokenizer()(d.strip())["input_ids"]) + 1 for d in text.read_text().split("\n\n")
    )
    assert rec2["tokens"] == n - 1  # one block of n tokens (< n_ctx): n - 1 predictions
    assert list(rec2["saes"]) == ["relu-n64-l1_0.001"]


def test_a_missing_corpus_is_named_by_keyword_and_by_flag(analyze_runs, tmp_path, capsys):
    from unsuperpose.analyze.splice_grid import SpliceError, read_text_blocks

    missing = tmp_path / "none.txt"
    with pytest.raises(SpliceError, match=rf"^corpus='{missing}': no such file"):
        read_text_blocks(missing, 16)
    sae = analyze_runs / "sae" / "tiny" / "layer1"
    sae = next(sae.glob("*/saes/*"))
    argv = ["analyze", "splice", "--dictionary", str(sae), "--no-progress"]
    assert main([*argv, "--corpus", str(missing)]) == 2
    assert f"error: --corpus {missing}: no such file" in capsys.readouterr().err
    assert main([*argv, "--tokens", "0"]) == 2
    assert "error: --tokens 0 must be at least 1" in capsys.readouterr().err


def test_splice_refuses_toy_dictionaries(analyze_runs, capsys):
    assert (
        main(["analyze", "splice", "--dictionary", str(analyze_runs / "toy"), "--no-progress"]) == 2
    )
    assert "LM activation store" in capsys.readouterr().err


def test_train_puts_the_spliced_figures_in_summary_csv(analyze_runs, tmp_path):
    import csv

    store = analyze_runs / "acts" / "tiny" / "layer1.zarr"
    assert (
        main(
            [
                "train",
                "--store",
                str(store),
                "--out",
                str(tmp_path),
                "--dict-sizes",
                "1x",
                "--l1",
                "1e-3,1e-1",
                "--steps",
                "20",
                "--batch-size",
                "64",
                "--splice-tokens",
                "60",
                "--wandb",
                "disabled",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "1x" / "summary.csv")))
    for col in (
        "ce_loss_recovered",
        "ce_loss_recovered_mean",
        "delta_ce",
        "delta_ce_se",
        "kl",
        "norm_ratio",
        "relative_reconstruction_bias",
        "splice_tokens",
        "ce_clean",
        "ce_zero",
        "ce_mean",
    ):
        assert col in rows[0], col
    assert int(rows[0]["splice_tokens"]) >= 60
    # the stronger penalty keeps less of the activation
    weak, strong = sorted(rows, key=lambda r: float(r["l1"]))
    assert float(strong["norm_ratio"]) < float(weak["norm_ratio"])
