"""Documents -> one flat token stream on disk -> packed blocks of n_ctx tokens.

Tokenising is the slow part (~150k tokens/s), and every stage needs the same tokens: the LM
trains on them, harvesting streams them through the model, the analysis decodes them. So the
corpus is tokenised once into a cache keyed by the corpus's content (not its path), and each
split is served as a memory-mapped (N, n_ctx) view: calling :func:`token_blocks` again is cheap.

Tokens come from GPT-2's BPE unless a model's own tokenizer is passed (:class:`ModelTokenizer`);
the cache and the fingerprint are keyed by the tokenizer's tag, so two tokenizers never share a
cache, and GPT-2's tag is the one caches had before other tokenizers existed.

Packing: every document is followed by the tokenizer's end-of-text token (``<|endoftext|>`` for
GPT-2 and Pythia) and preceded by the BOS token its tokenizer adds itself (``<s>`` for Llama's;
none for GPT-2's), documents are concatenated in corpus order, and the stream is cut into
consecutive blocks of n_ctx tokens; only the final partial block (fewer than n_ctx tokens) is
dropped, and :attr:`TokenBlocks.n_dropped` says how many.

The "all" split also carries :attr:`TokenBlocks.val_mask`, which tokens belong to the LM's
validation documents (the same seeded choice the "val" split serves), so that a harvest over
every document can still tell later stages which rows the LM never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np

from unsuperpose.config import write_json_atomic
from unsuperpose.hashing import json_sha256
from unsuperpose.lm.corpus import CorpusConfig, corpus_identity, iter_documents
from unsuperpose.lm.errors import CorpusError
from unsuperpose.lm.tokenizer import VOCAB_SIZE, ModelTokenizer, gpt2_tokenizer

Split = Literal["train", "val", "all"]
TOKENIZER_TAG = f"gpt2-bpe-{VOCAB_SIZE}"  # == gpt2_tokenizer().tag
_BATCH_DOCS = 512


def default_cache_dir() -> Path:
    """``$UNSUPERPOSE_CACHE/tokens``, else ``runs/cache/tokens`` under the working directory."""
    return Path(os.environ.get("UNSUPERPOSE_CACHE", "runs/cache")) / "tokens"


@dataclass
class TokenBlocks:
    """Packed blocks of one split: ``blocks[i]`` is the i-th run of n_ctx consecutive tokens."""

    blocks: np.ndarray  # (N, n_ctx) uint16 (uint32 for vocabularies over 65,536), memory-mapped
    fingerprint: str  # sha256 of corpus identity, split, n_ctx, tokenizer and the tokens themselves
    split: str
    n_ctx: int
    n_documents: int
    n_tokens: int  # tokens in the split's stream, EOT separators included
    n_dropped: int  # tokens of the final partial block, not served
    # (N, n_ctx) uint8, memory-mapped, aligned with ``blocks``: 1 where the token belongs to one of
    # the validation documents (each document's trailing EOT included). Only the "all" split of a
    # corpus with validation documents has one; it is None otherwise.
    val_mask: np.ndarray | None = None
    tokenizer: str = TOKENIZER_TAG  # the tag of the tokenizer that made the tokens

    def __len__(self) -> int:
        return len(self.blocks)


def _tokenise_into(cfg: CorpusConfig, tmp: Path, tok: ModelTokenizer) -> None:
    chunks: list[np.ndarray] = []
    ends: list[int] = []
    total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        for ids in tok.encode_documents(batch):
            arr = np.asarray(ids, dtype=tok.dtype)
            chunks.append(arr)
            total += len(arr)
            ends.append(total)
        batch.clear()

    for doc in iter_documents(cfg):
        batch.append(doc)
        if len(batch) == _BATCH_DOCS:
            flush()
    if batch:
        flush()
    if not ends:
        raise CorpusError(f"corpus={cfg.corpus!r} holds no text (no non-empty documents)")
    np.save(tmp / "stream.npy", np.concatenate(chunks))
    np.save(tmp / "doc_ends.npy", np.asarray(ends, dtype=np.int64))


def _corpus_cache(cfg: CorpusConfig, cache_dir: Path, tok: ModelTokenizer) -> Path:
    """The cache folder holding the whole corpus's stream.

    Built if missing, and renamed into place whole.
    """
    identity = {"corpus": corpus_identity(cfg), "tokenizer": tok.tag}
    path = cache_dir / json_sha256(identity)[:24]
    if (path / "identity.json").is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".building-"))
    try:
        _tokenise_into(cfg, tmp, tok)
        write_json_atomic(tmp / "identity.json", identity)
        try:
            tmp.rename(path)
        except OSError:  # another process finished the same cache first; theirs is identical
            if not (path / "identity.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def split_documents(n_docs: int, cfg: CorpusConfig) -> dict[str, np.ndarray]:
    """Document indices of each split, in corpus order; a seeded choice of held-out documents."""
    n_val = 0 if cfg.val_fraction == 0 else max(1, round(cfg.val_fraction * n_docs))
    if n_val >= n_docs:
        raise CorpusError(
            f"the corpus has {n_docs} document(s): too few to hold out a validation fraction of "
            f"{cfg.val_fraction}; add documents or hold out none with val_fraction=0"
        )
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(cfg.seed).permutation(n_docs)[:n_val]] = True
    every = np.arange(n_docs)
    return {"train": every[~is_val], "val": every[is_val], "all": every}


def _split_stream(path: Path, cfg: CorpusConfig, split: str) -> tuple[np.ndarray, dict]:
    """The split's token stream (memory-mapped) and its metadata, written once per split."""
    if split == "all":
        name = "all"
    else:
        name = f"{split}-seed{cfg.seed}-val{cfg.val_fraction!r}"
    stream_file, meta_file = path / f"{name}.npy", path / f"{name}.json"
    if not meta_file.is_file():
        stream = np.load(path / "stream.npy", mmap_mode="r")
        ends = np.load(path / "doc_ends.npy")
        docs = split_documents(len(ends), cfg)[split]
        starts = np.concatenate([[0], ends[:-1]])
        if split == "all":
            stream_file = path / "stream.npy"
            part = stream
        else:
            part = (
                np.concatenate([stream[starts[d] : ends[d]] for d in docs])
                if len(docs)
                else np.empty(0, dtype=stream.dtype)
            )
            fd, tmp = tempfile.mkstemp(dir=path, suffix=".npy")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, part)
            os.replace(tmp, stream_file)
        meta = {
            "file": stream_file.name,
            "n_documents": int(len(docs)),
            "n_tokens": int(len(part)),
            "sha256": hashlib.sha256(np.ascontiguousarray(part).tobytes()).hexdigest(),
        }
        write_json_atomic(meta_file, meta)
    meta = json.loads(meta_file.read_text())
    return np.load(path / meta["file"], mmap_mode="r"), meta


def _val_mask(path: Path, cfg: CorpusConfig) -> np.ndarray | None:
    """Per token of the "all" stream, 1 if its document is a validation document (memory-mapped).

    Built once per (seed, val_fraction) from the document ends, written through a memory map so
    that a corpus of billions of tokens never needs the mask in RAM; renamed into place whole.
    """
    if cfg.val_fraction == 0:
        return None
    mask_file = path / f"all-valmask-seed{cfg.seed}-val{cfg.val_fraction!r}.npy"
    if not mask_file.is_file():
        ends = np.load(path / "doc_ends.npy")
        starts = np.concatenate([[0], ends[:-1]])
        is_val = np.zeros(len(ends), dtype=np.uint8)
        is_val[split_documents(len(ends), cfg)["val"]] = 1
        fd, tmp = tempfile.mkstemp(dir=path, suffix=".npy")
        os.close(fd)
        try:
            mask = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(int(ends[-1]),))
            for i in range(
                0, len(ends), _BATCH_DOCS
            ):  # a batch of documents at a time: bounded RAM
                j = min(len(ends), i + _BATCH_DOCS)
                # ends[d] is past document d's EOT, so the separator belongs to its document.
                mask[starts[i] : ends[j - 1]] = np.repeat(is_val[i:j], ends[i:j] - starts[i:j])
            mask.flush()
            del mask
            os.replace(tmp, mask_file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return np.load(mask_file, mmap_mode="r")


def token_blocks(
    corpus: CorpusConfig,
    n_ctx: int,
    split: Split = "all",
    cache_dir: str | Path | None = None,
    tokenizer: ModelTokenizer | None = None,
) -> TokenBlocks:
    """Packed (N, n_ctx) token blocks of a split; the first call tokenises, later calls memory-map.

    ``tokenizer``: the model's own (``load_tokenizer(model_dir)``); GPT-2's BPE when None.
    """
    tok = tokenizer or gpt2_tokenizer()
    if split not in ("train", "val", "all"):
        raise CorpusError(f"split={split!r}: give 'train', 'val' or 'all'")
    if n_ctx < 2:
        raise CorpusError(f"n_ctx={n_ctx}: blocks must be at least 2 tokens long")
    path = _corpus_cache(
        corpus, Path(cache_dir) if cache_dir is not None else default_cache_dir(), tok
    )
    stream, meta = _split_stream(path, corpus, split)
    n_blocks = len(stream) // n_ctx
    if n_blocks == 0:
        raise CorpusError(
            f"the {split!r} split of corpus={corpus.corpus!r} has {len(stream)} tokens, "
            f"fewer than one block of n_ctx={n_ctx}; use more text, a smaller n_ctx or "
            f"another val_fraction (now val_fraction={corpus.val_fraction})"
        )
    identity = json.loads((path / "identity.json").read_text())
    fingerprint = json_sha256(
        {
            "identity": identity,
            "split": split,
            "n_ctx": n_ctx,
            "tokens": meta["sha256"],
            **(
                {} if split == "all" else {"seed": corpus.seed, "val_fraction": corpus.val_fraction}
            ),
        }
    )
    mask = _val_mask(path, corpus) if split == "all" else None
    return TokenBlocks(
        blocks=stream[: n_blocks * n_ctx].reshape(n_blocks, n_ctx),
        fingerprint=fingerprint,
        split=split,
        n_ctx=n_ctx,
        n_documents=meta["n_documents"],
        n_tokens=meta["n_tokens"],
        n_dropped=len(stream) - n_blocks * n_ctx,
        val_mask=None if mask is None else mask[: n_blocks * n_ctx].reshape(n_blocks, n_ctx),
        tokenizer=tok.tag,
    )


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats/token) of the empirical token distribution.

    It is the loss of the best context-free model.

    An LM whose validation loss is not clearly below this has learnt nothing about context.
    """
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=VOCAB_SIZE).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def describe(blocks: TokenBlocks) -> dict:
    """JSON-able summary of a TokenBlocks, for logs and provenance."""
    # Not dataclasses.asdict: it would deep-copy the memory-mapped arrays.
    out = {
        f.name: getattr(blocks, f.name)
        for f in fields(blocks)
        if f.name not in ("blocks", "val_mask")
    }
    out["n_blocks"] = len(blocks)
    return out


def describe_tokens(
    corpus: CorpusConfig,
    n_ctx: int,
    cache_dir: str | Path | None = None,
    tokenizer: ModelTokenizer | None = None,
) -> dict:
    """Block counts and fingerprints of every split, and the training split's unigram entropy."""
    splits = ["all", "train", "val"] if corpus.val_fraction > 0 else ["all"]
    out = {
        split: describe(token_blocks(corpus, n_ctx, split, cache_dir, tokenizer))
        for split in splits
    }
    train = token_blocks(
        corpus, n_ctx, "train" if corpus.val_fraction > 0 else "all", cache_dir, tokenizer
    )
    out["unigram_entropy"] = unigram_entropy(train.blocks)
    return out
