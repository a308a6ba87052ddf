import json

import numpy as np
import pytest

from unsuperpose.lm import (
    EOT_ID,
    CorpusConfig,
    CorpusError,
    corpus as corpus_module,
    get_tokenizer,
    iter_documents,
    token_blocks,
)
from unsuperpose.lm.tokens import split_documents


def _expected_stream(cfg, split):
    docs = list(iter_documents(cfg))
    keep = split_documents(len(docs), cfg)[split]
    tok = get_tokenizer()
    return np.concatenate([np.array(tok(docs[i])["input_ids"] + [EOT_ID]) for i in keep])


@pytest.mark.parametrize("split", ["all", "train", "val"])
def test_packing_loses_and_duplicates_nothing(tiny_corpus, tmp_path, split):
    blocks = token_blocks(tiny_corpus, 16, split, cache_dir=tmp_path)
    stream = _expected_stream(tiny_corpus, split)
    assert blocks.blocks.shape == (len(stream) // 16, 16)
    assert blocks.n_dropped == len(stream) % 16 < 16
    assert np.array_equal(blocks.blocks.ravel(), stream[: blocks.blocks.size])
    assert blocks.n_tokens == len(stream)
    # one EOT after every document of the split
    assert (stream == EOT_ID).sum() == blocks.n_documents


def test_literal_eot_text_does_not_split_documents(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"text": "a <|endoftext|> b"}) + "\n" + json.dumps({"text": "c d e f"}) + "\n"
    )
    blocks = token_blocks(
        CorpusConfig(corpus=str(path), val_fraction=0), 4, "all", cache_dir=tmp_path / "cache"
    )
    assert blocks.n_documents == 2 and (blocks.blocks == EOT_ID).sum() == 1


def test_cache_is_reused_and_fingerprints_say_what_differs(tiny_corpus, tmp_path, monkeypatch):
    first = token_blocks(tiny_corpus, 16, "train", cache_dir=tmp_path)
    monkeypatch.setattr(corpus_module, "iter_documents", lambda cfg: pytest.fail("re-tokenised"))
    again = token_blocks(tiny_corpus, 16, "train", cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint and np.array_equal(again.blocks, first.blocks)
    prints = {
        token_blocks(tiny_corpus, n, s, cache_dir=tmp_path).fingerprint
        for n in (8, 16)
        for s in ("train", "val", "all")
    }
    assert len(prints) == 6


def test_split_covers_all_documents_once(tiny_corpus, tmp_path):
    parts = [token_blocks(tiny_corpus, 8, s, cache_dir=tmp_path) for s in ("train", "val", "all")]
    assert parts[0].n_documents + parts[1].n_documents == parts[2].n_documents == 40
    assert parts[0].n_tokens + parts[1].n_tokens == parts[2].n_tokens


def test_block_longer_than_split_is_a_corpus_error(tiny_corpus, tmp_path):
    with pytest.raises(CorpusError, match="fewer than one block of n_ctx=100000"):
        token_blocks(tiny_corpus, 100_000, "val", cache_dir=tmp_path)
