import json

import numpy as np
import pytest

from unsuperpose.lm import CorpusConfig, CorpusError, iter_documents
from unsuperpose.lm.corpus import _strip_wikitext
from unsuperpose.lm.tokens import split_documents


def test_embedded_wikipedia_is_found_offline():
    docs = list(iter_documents(CorpusConfig(max_documents=5)))
    assert len(docs) == 5 and all(len(d) > 20 for d in docs)


def test_split_is_deterministic_disjoint_and_complete():
    cfg = CorpusConfig(val_fraction=0.25, seed=3)
    a, b = split_documents(100, cfg), split_documents(100, cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert len(a["val"]) == 25 and not set(a["val"]) & set(a["train"])
    assert sorted(np.concatenate([a["train"], a["val"]])) == list(range(100))
    other = split_documents(100, CorpusConfig(val_fraction=0.25, seed=4))
    assert not np.array_equal(a["val"], other["val"])


def test_txt_documents_are_blank_line_separated(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "third"}) + "\n")
    docs = list(iter_documents(CorpusConfig(corpus=str(tmp_path), text_field="body")))
    assert docs == ["first doc\nstill first", "second doc", "third"]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: None, "not 'wiki', 'gensim', an existing file"),
        (lambda p: p.write_text("\n \n"), "holds no text"),
        (
            lambda p: p.write_text(json.dumps({"title": "x"}) + "\n"),
            "no field 'text'.*text_field=NAME",
        ),
    ],
)
def test_bad_corpus_is_one_clear_error(tmp_path, setup, match):
    from unsuperpose.lm import token_blocks

    path = tmp_path / "c.jsonl"
    setup(path)
    with pytest.raises(CorpusError, match=match):
        token_blocks(CorpusConfig(corpus=str(path)), 8, "all", cache_dir=tmp_path / "cache")
    assert not list(tmp_path.glob("cache/*/identity.json"))  # nothing half-built looks complete


def test_wikitext_markup_is_stripped():
    import mwparserfromhell

    text = "'''Bold''' [[Link|shown]] {{cite web|x=1}}<ref>note</ref> [[Category:Foo]] end"
    plain = _strip_wikitext(mwparserfromhell, text)
    assert "Bold" in plain and "shown" in plain and plain.endswith("end")
    assert not any(junk in plain for junk in ("'''", "[[", "cite", "note", "Category"))


def test_saved_datasets_dataset_with_text_field(tmp_path):
    import datasets

    datasets.Dataset.from_dict(
        {"content": ["alpha beta", "", "gamma"], "id": [1, 2, 3]}
    ).save_to_disk(tmp_path / "ds")
    cfg = CorpusConfig(corpus=str(tmp_path / "ds"), text_field="content")
    assert list(iter_documents(cfg)) == ["alpha beta", "gamma"]
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_documents(CorpusConfig(corpus=str(tmp_path / "ds"))))
