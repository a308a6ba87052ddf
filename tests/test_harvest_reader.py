"""Reading stores back: the shuffled, resumable, endless batch stream and refusing bad stores."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unsuperpose.harvest import ActivationStore, StoreError, store
from unsuperpose.harvest.bf16 import BF16
from unsuperpose.harvest.writer import ChunkWriter
from unsuperpose.train.source import check_source

ROWS, CHUNK, D = 1000, 64, 4  # 15 whole chunks and a partial one of 40 rows
# No row is marked held out, so the last quarter of the chunks is (4 of 16: rows 768..999); the
# training stream serves the rest. tests/test_harvest_heldout.py tests the rules themselves.
TRAIN = 12 * CHUNK


def labelled_rows(lo: int, hi: int) -> np.ndarray:
    """Row i holds (i // 256, i % 256, 1, -1): exact in bfloat16, so every row is recognisable."""
    i = np.arange(lo, hi)
    return np.stack([i // 256, i % 256, np.ones_like(i), -np.ones_like(i)], 1).astype(BF16)


def row_ids(batch: torch.Tensor) -> np.ndarray:
    x = batch.numpy()
    assert (x[:, 2] == 1).all() and (x[:, 3] == -1).all()
    return (x[:, 0] * 256 + x[:, 1]).astype(np.int64)


def write_store(path: Path, rows: int = ROWS, upto: int | None = None) -> Path:
    """A store of labelled rows, written through the harvest writer; ``upto`` stops early."""
    prov = store.Provenance(
        model_dir="m",
        weights_sha256="w",
        hook="blocks.0.mlp.hook_post",
        layer=0,
        width=D,
        n_ctx=8,
        corpus_fingerprint="c",
    )
    group = store.create(path, prov, rows, CHUNK, batch_size=1)
    end = rows if upto is None else upto
    writer = ChunkWriter(group, 0, rows)
    pos = np.arange(end) % 8
    writer.add(labelled_rows(0, end), np.arange(end), pos)
    writer.close() if upto is None else writer.abort()
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> ActivationStore:
    return ActivationStore(write_store(tmp_path_factory.mktemp("reader") / "s.zarr"))


def take(it, n: int) -> list[torch.Tensor]:
    out = list(itertools.islice(it, n))
    it.close()
    return out


def test_store_is_an_activation_source(labelled):
    assert check_source(labelled) is labelled
    assert labelled.d == D and labelled.rows == ROWS and labelled.n_chunks == 16
    assert labelled.train_rows == TRAIN and labelled.heldout_rows() == ROWS - TRAIN
    desc = labelled.describe()
    assert desc["hook"] == "blocks.0.mlp.hook_post" and desc["rows"] == ROWS and desc["complete"]
    assert desc["train_rows"] == TRAIN and desc["heldout_rows"] == ROWS - TRAIN
    assert (
        desc["heldout"] == "the last 4 chunks (232 rows), held out whole "
        "(the store holds none of the LM's validation documents)"
    )


def test_shuffled_batches_are_a_permutation_of_the_training_rows_over_each_epoch(labelled):
    batches = take(labelled.batches(48, seed=3), 3 * TRAIN // 48)
    assert all(b.dtype == torch.float32 and b.shape == (48, D) for b in batches)
    epochs = [
        np.concatenate([row_ids(b) for b in batches[e * 16 : (e + 1) * 16]]) for e in range(3)
    ]
    for ids in epochs:
        np.testing.assert_array_equal(np.sort(ids), np.arange(TRAIN))
    assert not np.array_equal(epochs[0], np.arange(TRAIN))
    assert not np.array_equal(epochs[0], epochs[1])  # each epoch is reshuffled


def test_a_batch_mixes_rows_of_several_chunks(labelled):
    [first] = take(labelled.batches(64, seed=0), 1)
    chunks = np.unique(row_ids(first) // CHUNK)
    assert len(chunks) >= 4  # a shuffle buffer of 8 chunks, not one chunk at a time
    [small] = take(labelled.batches(64, seed=0, buffer_chunks=1), 1)
    assert len(np.unique(row_ids(small) // CHUNK)) == 1


def test_batches_are_deterministic_per_seed(labelled):
    a = take(labelled.batches(37, seed=5), 10)
    b = take(labelled.batches(37, seed=5), 10)
    c = take(labelled.batches(37, seed=6), 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("start", [1, 7, 27, 60])  # 27 * 37 rows crosses the first epoch's end
def test_start_k_continues_the_stream_exactly(labelled, shuffle, start):
    whole = take(labelled.batches(37, seed=1, shuffle=shuffle), start + 5)
    resumed = take(labelled.batches(37, seed=1, start=start, shuffle=shuffle), 5)
    for x, y in zip(whole[start:], resumed):
        assert torch.equal(x, y)


def test_unshuffled_batches_read_the_training_rows_in_order_and_wrap_around(labelled):
    batches = take(labelled.batches(300, shuffle=False), 4)
    ids = np.concatenate([row_ids(b) for b in batches])
    np.testing.assert_array_equal(ids, np.arange(1200) % TRAIN)


def test_closing_the_stream_stops_the_prefetch_thread(labelled):
    before = {t.ident for t in threading.enumerate()}
    take(labelled.batches(16, seed=0), 2)
    assert not [
        t for t in threading.enumerate() if t.name == "store-prefetch" and t.ident not in before
    ]


def test_incomplete_store_is_refused_or_read_up_to_its_last_whole_chunk(tmp_path):
    path = write_store(tmp_path / "cut.zarr", upto=5 * CHUNK + 10)  # 10 rows never become a chunk
    with pytest.raises(
        StoreError, match=r"incomplete \(320 of 1,000 rows\).*allow_incomplete=True"
    ):
        ActivationStore(path)
    part = ActivationStore(path, allow_incomplete=True)
    assert part.rows == 5 * CHUNK and part.train_rows == 4 * CHUNK  # its own last chunk held out
    ids = np.concatenate([row_ids(b) for b in take(part.batches(32, seed=0), 8)])
    np.testing.assert_array_equal(np.sort(ids), np.arange(4 * CHUNK))


def test_a_corrupt_chunk_is_detected_on_read(tmp_path):
    path = write_store(tmp_path / "bad.zarr")
    chunk = path / "acts" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    s = ActivationStore(path)
    s.read_rows(0, CHUNK)  # other chunks are fine
    with pytest.raises(StoreError, match=r"rows 192\.\.256 is corrupt \(crc32c"):
        s.read_rows(3 * CHUNK, 4 * CHUNK)
    with pytest.raises(StoreError, match="corrupt"):
        take(s.batches(ROWS, shuffle=False), 1)


def test_a_missing_chunk_is_detected_on_open(tmp_path):
    path = write_store(tmp_path / "hole.zarr")
    (path / "acts" / "c" / "7" / "0").unlink()
    with pytest.raises(StoreError, match="1 chunk.*missing.*rows from 448"):
        ActivationStore(path)


def test_something_that_is_not_a_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore(tmp_path)
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not an unsuperpose activation store"):
        ActivationStore(tmp_path / "plain.zarr")
