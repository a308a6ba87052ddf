"""The feature browser on a planted store: a latent that fires on one token id must show exactly
that token, in its own block's context, with the right frequency; bad input gets one clear error."""

import shutil

import numpy as np
import pytest
import torch

from unsuperpose.analyze.browser import BrowserError, contexts, scan
from unsuperpose.analyze.features import BrowseSettings, browse, build_browser, find_saes
from unsuperpose.cli import main
from unsuperpose.harvest import ActivationStore, store
from unsuperpose.harvest.bf16 import BF16
from unsuperpose.harvest.writer import ChunkWriter
from unsuperpose.lm import get_tokenizer
from unsuperpose.train import SAE

D, N_CTX, ROWS = 16, 20, 1000
TOK = get_tokenizer()
VOCAB = [TOK.encode(w)[0] for w in (" cat", " dog", " owl", " fox", " the", " river", ",", ".")]
PLANTED = VOCAB[2]  # " owl"


def write_store(path, acts, tokens, positions, chunk_rows=128):
    prov = store.Provenance(
        model_dir="planted",
        weights_sha256="w",
        hook="blocks.1.mlp.hook_post",
        layer=1,
        width=acts.shape[1],
        n_ctx=N_CTX,
        corpus_fingerprint="c",
    )
    group = store.create(path, prov, len(acts), chunk_rows, batch_size=1)
    w = ChunkWriter(group, 0, len(acts))
    w.add(acts.astype(BF16), tokens.astype(np.int32), positions.astype(np.int32))
    w.close()
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Rows in blocks of N_CTX; coordinate 0 is 4.0 exactly where the token is PLANTED, else 0;
    the other coordinates are noise. Latent 0 of the SAE reads coordinate 0 with threshold 1."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    tokens = rng.choice(VOCAB, ROWS)
    acts = rng.normal(0, 0.3, (ROWS, D)).astype(np.float32)
    acts[:, 0] = np.where(tokens == PLANTED, 4.0, 0.0)
    path = write_store(tmp / "layer1.zarr", acts, tokens, np.arange(ROWS) % N_CTX)
    w_enc = torch.randn(D, 8, generator=torch.Generator().manual_seed(0)) * 0.3
    w_enc[:, 0] = 0
    w_enc[0, 0] = 1.0
    w_enc[0, 1:] = 0  # no other latent sees the planted coordinate
    b_enc = torch.zeros(8)
    b_enc[0] = -1.0
    sae = SAE(D, 8, params={"W_enc": w_enc, "b_enc": b_enc, "W_dec": torch.randn(8, D)})
    sae_dir = sae.save(
        tmp / "saes" / "n8-l1_0.001",
        {"l1": 1e-3, "source": {"kind": "activation_store", "path": str(path)}},
    )
    return tmp, path, tokens, sae_dir


def test_the_planted_latent_fires_exactly_on_its_token(planted):
    _, path, tokens, sae_dir = planted
    s = ActivationStore(path)
    sae = SAE.load(sae_dir)
    stats = scan(
        s, {"sae": sae.encode, "neurons": lambda x: x}, top=5, batch_rows=96, progress=False
    )
    st = stats["sae"]
    assert st.count[0] == int((tokens == PLANTED).sum())
    assert st.freq[0] == pytest.approx((tokens == PLANTED).mean())
    assert np.allclose(st.top_vals[0], 3.0)  # 4.0 - threshold 1, every time
    assert set(tokens[st.top_rows[0]]) == {PLANTED}
    assert st.hist[0].sum() == st.count[0]
    ctx = contexts(stats, path, left=4, right=2)["sae"][0]
    assert len(ctx) == 5
    for c in ctx:
        assert c.tokens[c.at] == PLANTED and c.tokens[c.at] == tokens[c.row]
        pos = c.row % N_CTX
        # Never across a block boundary: the context starts no earlier than the block does.
        assert c.at == min(4, pos)
        assert c.tokens == list(tokens[c.row - c.at : c.row - c.at + len(c.tokens)])
        assert len(c.tokens) - c.at - 1 == min(2, N_CTX - 1 - pos)


def test_the_page_highlights_the_planted_token_and_has_the_neuron_baseline(planted, tmp_path):
    _, path, tokens, sae_dir = planted
    pages = build_browser(
        [sae_dir], ActivationStore(path), tmp_path, TOK.decode, top=5, progress=False
    )
    assert set(pages) == {"n8-l1_0.001", "neurons", "index"}
    html = pages["n8-l1_0.001"].read_text()
    row0 = html[html.index('<tr data-i="0"') :]
    row0 = row0[: row0.index("</tr>")]
    assert row0.count("<mark") == 5 and row0.count("> owl</mark>") == 5
    assert f'data-freq="{(tokens == PLANTED).mean():.6g}"' in row0
    assert "sortUnits('freq'" in html
    assert pages["neurons"].read_text().count("<tr data-i=") == D


def test_cli_writes_one_page_per_dictionary_of_a_set(planted, tmp_path):
    root, path, _, _ = planted
    assert find_saes(root) == [root / "saes" / "n8-l1_0.001"]
    code = main(
        [
            "analyze",
            "features",
            "--dictionary",
            str(root),
            "--out",
            str(tmp_path),
            "--top",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    assert (tmp_path / "n8-l1_0.001.html").exists() and (tmp_path / "neurons.html").exists()


def test_a_dictionary_of_another_width_is_refused(planted, tmp_path):
    _, path, _, _ = planted
    other = SAE(D + 1, 4, tied=True).save(tmp_path / "saes" / "n4-l1_1", {"l1": 1.0})
    with pytest.raises(BrowserError, match="width 17 .*width 16.*trained on, store=PATH"):
        build_browser([other], ActivationStore(path), tmp_path / "out", TOK.decode, progress=False)


def test_the_cli_names_the_store_flag_for_a_dictionary_of_another_width(planted, tmp_path, capsys):
    _, path, _, _ = planted
    other = SAE(D + 1, 4, tied=True).save(tmp_path / "saes" / "n4-l1_1", {"l1": 1.0})
    argv = [
        "analyze",
        "features",
        "--dictionary",
        str(other),
        "--store",
        str(path),
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "width 17 " in err and "trained on, --store PATH" in err and "store=" not in err
    assert "Traceback" not in err


def test_a_store_without_tokens_is_refused_before_the_pass(planted, tmp_path):
    _, path, _, sae_dir = planted
    bare = tmp_path / "bare.zarr"
    shutil.copytree(path, bare)
    shutil.rmtree(bare / "tokens")
    with pytest.raises(BrowserError, match="kept no tokens.*unsuperpose harvest"):
        build_browser(
            [sae_dir], ActivationStore(bare), tmp_path / "out", TOK.decode, progress=False
        )


def test_a_toy_dictionary_needs_a_store(tmp_path, capsys):
    sae = SAE(4, 4, tied=True).save(
        tmp_path / "saes" / "n4-l1_1", {"l1": 1.0, "source": {"kind": "toy"}}
    )
    assert main(["analyze", "features", "--dictionary", str(sae)]) == 2
    err = capsys.readouterr().err
    assert "pass one as --store PATH" in err and "store=" not in err


def test_the_library_names_its_keyword_and_the_cli_its_flag(planted, tmp_path, capsys):
    _, path, _, sae_dir = planted
    with pytest.raises(BrowserError, match=r"^top=0 must be at least 1$"):
        browse([sae_dir], tmp_path / "out", BrowseSettings(top=0), store=path)
    with pytest.raises(BrowserError, match=r"^model='m' needs endpoint=URL"):
        BrowseSettings(model="m").autointerp()
    argv = [
        "analyze",
        "features",
        "--dictionary",
        str(sae_dir),
        "--store",
        str(path),
        "--no-progress",
    ]
    assert main([*argv, "--top", "0"]) == 2
    assert "error: --top 0 must be at least 1" in capsys.readouterr().err
    assert main([*argv, "--autointerp-model", "m"]) == 2
    assert "error: --autointerp-model m needs --autointerp-endpoint URL" in capsys.readouterr().err


def test_token_concentration_is_the_share_of_the_commonest_token_among_the_top_rows():
    from unsuperpose.analyze.browser import Context
    from unsuperpose.analyze.monosemantic import concentration, summary

    def ctx(prev, tok):
        return Context(
            row=0,
            act=1.0,
            tokens=[prev, tok] if prev is not None else [tok],
            at=1 if prev is not None else 0,
        )

    one_token = [ctx(7, 5)] * 3 + [ctx(8, 5)]  # token 5 four times, after 7 or 8
    mixed = [ctx(1, 2), ctx(3, 4), ctx(None, 6), ctx(1, 2)]
    assert concentration(one_token, 4) == 1.0
    assert concentration(one_token, 4, pairs=True) == 0.75  # (7, 5) three times of four
    assert concentration(mixed, 4) == 0.5 and concentration(mixed, 4, pairs=True) == 0.5
    assert concentration(mixed[:3], 4) is None  # fewer firing rows than k: unscored
    s = summary([one_token, mixed, mixed[:3]], 4)
    assert s["token_scored"] == 2 and s["token_median"] == 0.75 and sum(s["token_hist"]) == 2


def test_the_index_compares_concentration_of_latents_and_neurons(tmp_path, analyze_runs):
    import json

    from unsuperpose.cli import main

    grid = analyze_runs / "sae" / "tiny" / "layer1" / "1x+2x"
    out = tmp_path / "features"
    assert (
        main(
            [
                "analyze",
                "features",
                "--dictionary",
                str(grid),
                "--out",
                str(out),
                "--top",
                "5",
                "--no-progress",
            ]
        )
        == 0
    )
    mono = json.loads((out / "monosemanticity.json").read_text())
    assert "neurons" in mono and len(mono) == 5
    assert mono["neurons"]["token_scored"] > 0 and 0 < mono["neurons"]["token_median"] <= 1
    assert "token concentration, median (quartiles)" in (out / "index.html").read_text()
