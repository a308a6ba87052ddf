"""Held-out rows: which rows a store holds out, that the training stream never yields them, and
that ``heldout_batches`` yields exactly them. Rows are labelled with their own index, so every
row a stream yields says where it came from."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unsuperpose.cli import main
from unsuperpose.harvest import ActivationStore, StoreError, store
from unsuperpose.harvest.bf16 import BF16
from unsuperpose.harvest.heldout import last_chunks
from unsuperpose.harvest.writer import ChunkWriter
from unsuperpose.lm import EOT_ID, CorpusConfig, get_tokenizer, iter_documents, token_blocks
from unsuperpose.lm.tokens import split_documents

ROWS, CHUNK, D = 1000, 64, 4  # 15 whole chunks and a partial one of 40 rows


def document_marks() -> np.ndarray:
    """Held-out runs as validation documents leave them: inside a chunk, across a chunk
    boundary, covering chunk 5 (rows 320..383) whole, and at the very end of the store."""
    marks = np.zeros(ROWS, np.uint8)
    for lo, hi in ((10, 40), (63, 65), (300, 420), (990, 1000)):
        marks[lo:hi] = 1
    return marks


MARKS = document_marks()
HELD = np.flatnonzero(MARKS)
TRAIN = np.flatnonzero(MARKS == 0)


def labelled_rows(lo: int, hi: int) -> np.ndarray:
    i = np.arange(lo, hi)
    return np.stack([i // 256, i % 256, np.ones_like(i), -np.ones_like(i)], 1).astype(BF16)


def row_ids(batch: torch.Tensor) -> np.ndarray:
    x = batch.numpy()
    assert batch.dtype == torch.float32 and (x[:, 2] == 1).all() and (x[:, 3] == -1).all()
    return (x[:, 0] * 256 + x[:, 1]).astype(np.int64)


def write_store(path: Path, marks: np.ndarray | None, rows: int = ROWS, corpus: str = "c") -> Path:
    prov = store.Provenance(
        model_dir="m",
        weights_sha256="w",
        hook="blocks.0.mlp.hook_post",
        layer=0,
        width=D,
        n_ctx=8,
        corpus_fingerprint=corpus,
    )
    writer = ChunkWriter(store.create(path, prov, rows, CHUNK, batch_size=1), 0, rows)
    writer.add(
        labelled_rows(0, rows),
        np.arange(rows),
        np.arange(rows) % 8,
        None if marks is None else marks[:rows],
    )
    writer.close()
    return path


def predate_heldout(path: Path) -> Path:
    """Make a store look like one written before the held-out array existed."""
    shutil.rmtree(path / store.HELDOUT)
    return path


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> ActivationStore:
    return ActivationStore(write_store(tmp_path_factory.mktemp("heldout") / "s.zarr", MARKS))


def take(it, n: int) -> list[torch.Tensor]:
    out = list(itertools.islice(it, n))
    it.close()
    return out


def stream_ids(s: ActivationStore, batch: int, rows: int, **kw) -> np.ndarray:
    return np.concatenate([row_ids(b) for b in take(s.batches(batch, **kw), -(-rows // batch))])[
        :rows
    ]


# -- the training stream -----------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_training_stream_never_yields_a_held_out_row(marked, shuffle):
    assert (
        marked.rows == ROWS
        and marked.train_rows == len(TRAIN)
        and marked.heldout_rows() == len(HELD)
    )
    ids = stream_ids(marked, 50, 3 * len(TRAIN), seed=2, shuffle=shuffle)
    assert not np.isin(ids, HELD).any()
    epochs = ids.reshape(3, len(TRAIN))
    for epoch in epochs:  # each epoch serves every training row once: the epochs count only those
        np.testing.assert_array_equal(np.sort(epoch), TRAIN)
    if shuffle:
        assert not np.array_equal(epochs[0], epochs[1])
    else:
        np.testing.assert_array_equal(epochs[0], TRAIN)


@pytest.mark.parametrize("start", [5, 23, 50])  # 23 * 37 rows crosses the first epoch's end
def test_start_k_continues_the_stream_exactly(marked, start):
    whole = take(marked.batches(37, seed=1), start + 4)
    resumed = take(marked.batches(37, seed=1, start=start), 4)
    for x, y in zip(whole[start:], resumed):
        assert torch.equal(x, y)


def test_a_wholly_held_out_chunk_is_never_read(tmp_path):
    path = write_store(tmp_path / "s.zarr", MARKS)
    chunk = path / "acts" / "c" / "5" / "0"  # rows 320..383, all held out
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    s = ActivationStore(path)
    assert all(5 not in g for e in range(3) for g in s.epoch_groups(0, e, True, 4))
    assert not np.isin(stream_ids(s, 64, 2 * s.train_rows), HELD).any()  # reads fine
    with pytest.raises(StoreError, match="corrupt"):
        list(s.heldout_batches(64))


def test_a_store_whose_rows_are_all_held_out_is_refused_for_training(tmp_path):
    s = ActivationStore(write_store(tmp_path / "val.zarr", np.ones(ROWS, np.uint8)))
    assert s.train_rows == 0 and s.heldout_rows() == ROWS
    with pytest.raises(StoreError, match="all of its 1,000 rows are held out.*harvest more tokens"):
        next(s.batches(16))


def test_all_zero_chunks_are_written_and_a_missing_chunk_of_marks_is_detected(tmp_path):
    """Marks are mostly zeros; a missing chunk of them would let validation rows into training."""
    prov = store.Provenance(
        model_dir="m",
        weights_sha256="w",
        hook="h",
        layer=0,
        width=D,
        n_ctx=8,
        corpus_fingerprint="c",
    )
    path = tmp_path / "zeros.zarr"
    writer = ChunkWriter(store.create(path, prov, 200, CHUNK, batch_size=1), 0, 200)
    writer.add(np.zeros((200, D), BF16), np.zeros(200), np.zeros(200))
    writer.close()
    assert ActivationStore(path).n_chunks == 4  # every chunk of acts and marks is on disk
    (path / "heldout" / "c" / "1").unlink()
    with pytest.raises(StoreError, match="1 chunk.*of heldout are missing.*rows from 64"):
        ActivationStore(path)


# -- the held-out rows -------------------------------------------------------------------------


def test_heldout_batches_yield_exactly_the_marked_rows_in_store_order(marked):
    batches = list(marked.heldout_batches(50))
    assert [len(b) for b in batches] == [50, 50, 50, len(HELD) - 150]
    assert all(b.dtype == torch.float32 and b.shape[1] == D for b in batches)
    np.testing.assert_array_equal(np.concatenate([row_ids(b) for b in batches]), HELD)
    np.testing.assert_array_equal(marked.heldout_mask(), MARKS == 1)
    first = list(marked.heldout_batches(50, max_rows=70))
    assert [len(b) for b in first] == [50, 20] and marked.heldout_rows(70) == 70
    np.testing.assert_array_equal(np.concatenate([row_ids(b) for b in first]), HELD[:70])
    assert list(marked.heldout_batches(8, max_rows=0)) == [] and marked.heldout_rows(0) == 0
    assert marked.heldout_rows(10**9) == len(HELD)
    [one] = marked.heldout_batches(ROWS)
    np.testing.assert_array_equal(row_ids(one), HELD)


def test_describe_names_the_rule_and_the_counts(marked):
    desc = marked.describe()
    json.dumps(desc)  # saved beside every SAE trained on the store
    assert (
        desc["rows"] == ROWS
        and desc["train_rows"] == len(TRAIN)
        and desc["heldout_rows"] == len(HELD)
    )
    assert desc["heldout_rule"] == "documents"
    assert (
        desc["heldout"]
        == marked.heldout_description
        == "the 162 rows of the LM's validation documents (16.2% of the store)"
    )
    assert len(desc["fingerprint"]) == 64 and desc["fingerprint"] == marked.fingerprint


@pytest.mark.parametrize(
    "rows, chunk, held",
    [
        (64, 64, 0),  # one chunk: nothing to spare
        (128, 64, 1),
        (3 * 64, 64, 1),  # two or three chunks: still one
        (1000, 64, 4),  # 65,536 rows would be all of it: a quarter of the chunks
        (20 * 16384, 16384, 4),  # 4 chunks hold 65,536 rows, under the quarter (5)
        (20 * 16384 - 100, 16384, 5),  # a partial last chunk: one more chunk to reach 65,536
        (100 * 4096, 4096, 16),
        (8 * 65536, 65536, 1),
    ],
)
def test_the_chunks_rule_holds_out_enough_rows_but_at_most_a_quarter(rows, chunk, held):
    assert last_chunks(rows, chunk) == held


def test_a_store_without_validation_rows_holds_out_its_last_chunks(tmp_path):
    s = ActivationStore(write_store(tmp_path / "train.zarr", np.zeros(ROWS, np.uint8)))
    first = 12 * CHUNK  # the last 4 of 16 chunks
    np.testing.assert_array_equal(s.heldout_mask(), np.arange(ROWS) >= first)
    assert s.describe()["heldout_rule"] == "chunks"
    assert s.heldout_description == (
        "the last 4 chunks (232 rows), held out whole (the store "
        "holds none of the LM's validation documents)"
    )
    np.testing.assert_array_equal(
        np.concatenate([row_ids(b) for b in s.heldout_batches(100)]), np.arange(first, ROWS)
    )
    ids = stream_ids(s, 64, 3 * first, seed=0)
    assert ids.max() < first
    np.testing.assert_array_equal(np.sort(ids[:first]), np.arange(first))


def test_a_store_from_before_held_out_rows_falls_back_to_its_last_chunks_and_says_so(
    tmp_path, capsys
):
    new = ActivationStore(write_store(tmp_path / "new.zarr", None))
    capsys.readouterr()
    old = ActivationStore(predate_heldout(write_store(tmp_path / "old.zarr", MARKS)))
    printed = capsys.readouterr().out
    assert (
        "was harvested before stores recorded held-out rows" in printed
        and "last 4 chunks" in printed
    )
    desc = old.describe()
    assert desc["heldout_rule"] == "chunks" and desc["heldout_rows"] == ROWS - 12 * CHUNK
    assert (
        "predates held-out rows" in desc["heldout"]
        and "harvest it again with force=True" in desc["heldout"]
    )
    np.testing.assert_array_equal(old.heldout_mask(), new.heldout_mask())
    assert stream_ids(old, 64, 12 * CHUNK, seed=0).max() < 12 * CHUNK
    # The same rows held out of the same data: the same training data, the same run identity.
    assert old.fingerprint == new.fingerprint


def test_the_fingerprint_is_stable_and_differs_for_other_data_of_the_same_width(tmp_path):
    path = write_store(tmp_path / "a.zarr", MARKS)
    a = ActivationStore(path).fingerprint
    assert ActivationStore(path).fingerprint == a
    others = [
        write_store(tmp_path / "corpus.zarr", MARKS, corpus="c2"),
        write_store(tmp_path / "rows.zarr", MARKS, rows=900),
        write_store(tmp_path / "marks.zarr", np.roll(MARKS, 64)),
        write_store(tmp_path / "chunks.zarr", None),
    ]
    prints = [ActivationStore(p).fingerprint for p in others]
    assert ActivationStore(others[0]).d == ActivationStore(path).d
    assert len({a, *prints}) == 5


# -- the corpus's validation documents ---------------------------------------------------------


def test_the_val_mask_marks_the_tokens_of_the_validation_documents(tiny_corpus, tmp_path):
    docs = list(iter_documents(tiny_corpus))
    val = set(split_documents(len(docs), tiny_corpus)["val"].tolist())
    tok = get_tokenizer()
    ids = [tok(d)["input_ids"] + [EOT_ID] for d in docs]  # the EOT belongs to its document
    want = np.concatenate([np.full(len(t), i in val, np.uint8) for i, t in enumerate(ids)])
    blocks = token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path)
    mask = blocks.val_mask
    assert mask.shape == blocks.blocks.shape and isinstance(mask, np.memmap)
    np.testing.assert_array_equal(mask.ravel(), want[: blocks.blocks.size])
    # The marked tokens are the "val" split's stream, in order, EOT separators included.
    val_stream = np.concatenate([ids[i] for i in sorted(val)])
    marked = blocks.blocks.ravel()[mask.ravel() == 1]
    np.testing.assert_array_equal(marked, val_stream[: len(marked)])
    assert (marked == EOT_ID).sum() >= len(val) - 1
    again = token_blocks(tiny_corpus, 16, "all", cache_dir=tmp_path)  # cached, memory-mapped
    np.testing.assert_array_equal(again.val_mask, mask)
    assert token_blocks(tiny_corpus, 16, "train", cache_dir=tmp_path).val_mask is None
    assert token_blocks(tiny_corpus, 16, "val", cache_dir=tmp_path).val_mask is None
    none = CorpusConfig(corpus=tiny_corpus.corpus, val_fraction=0, seed=0)
    assert token_blocks(none, 16, "all", cache_dir=tmp_path).val_mask is None


def test_harvest_command_marks_the_lms_validation_rows(
    tiny_lm_dir, tiny_corpus, tmp_path, one_torch_thread
):
    out = tmp_path / "acts"
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(tiny_lm_dir),
                "--layer",
                "1",
                "--out",
                str(out),
                "--chunk-rows",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    s = ActivationStore(out / "layer1.zarr")
    mask = token_blocks(tiny_corpus, 32, "all").val_mask.ravel()[: s.rows] == 1
    assert 0 < mask.sum() < s.rows
    np.testing.assert_array_equal(s.heldout_mask(), mask)
    assert s.describe()["heldout_rule"] == "documents" and s.heldout_rows() == mask.sum()
    got = torch.cat(list(s.heldout_batches(100)))
    torch.testing.assert_close(
        got, torch.from_numpy(s.read_rows(0, s.rows).astype(np.float32)[mask]), rtol=0, atol=0
    )
    # Harvested from the training documents only: no validation rows, so whole chunks instead.
    assert (
        main(
            [
                "harvest",
                "--lm",
                str(tiny_lm_dir),
                "--layer",
                "1",
                "--out",
                str(tmp_path / "train"),
                "--split",
                "train",
                "--tokens",
                "300",
                "--chunk-rows",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    t = ActivationStore(tmp_path / "train" / "layer1.zarr")
    assert t.describe()["heldout_rule"] == "chunks" and t.heldout_rows() == 300 - 4 * 64
