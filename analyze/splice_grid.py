"""The spliced-in evaluation of dictionaries trained on an LM's activation store: the LM's
validation documents as token blocks, the store's mean (for mean ablation), and the columns
``unsuperpose train`` adds to summary.csv per dictionary (``splice_columns``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from unsuperpose import distributed, storage
from unsuperpose.analyze.splice import splice_eval
from unsuperpose.config import write_json_atomic

DEFAULT_TOKENS = 16_384  # predicted tokens: delta CE's standard error is then ~1e-3 nats (README)


class SpliceError(ValueError):
    """No text to splice on: the LM records no corpus, or held out no documents (the message
    says to pass a text file instead, ``--corpus`` on the command line), the text file is
    missing or too short, or the dictionaries have no LM to splice into."""


def validation_blocks(
    model_dir: Path, n_ctx: int, tokens: int, store_corpus: dict | None = None
) -> tuple[list[np.ndarray], dict]:
    """Enough of the LM's validation-document blocks for ``tokens`` predicted tokens, in the
    LM's own tokens. A model that records no corpus of its own (a downloaded one, harvested with
    --corpus) uses the corpus its store was harvested from: its validation documents are the
    store's held-out rows."""
    from unsuperpose.lm import CorpusConfig, model_info, model_tokenizer, token_blocks

    corpus = model_info(model_dir).get("corpus")
    if not corpus and store_corpus:
        corpus = {k: v for k, v in store_corpus.items() if k != "tokenizer"}
    if not corpus:
        raise SpliceError(
            f"{model_dir} does not record the corpus it was trained on, so its validation "
            "documents are unknown; pass a text file as corpus=PATH"
        )
    cfg = CorpusConfig(**corpus)
    if cfg.val_fraction == 0:
        raise SpliceError(
            f"{model_dir} was trained with no held-out documents (val_fraction 0); pass "
            "a text file as corpus=PATH"
        )
    val = token_blocks(cfg, n_ctx, "val", tokenizer=model_tokenizer(model_dir))
    n = min(len(val), math.ceil(tokens / (n_ctx - 1)))
    return [np.asarray(b, dtype=np.int64) for b in val.blocks[:n]], {
        "split": "val",
        "corpus": corpus,
        "fingerprint": val.fingerprint,
    }


def store_mean(store) -> torch.Tensor:
    """Mean activation over every row of the store, in float64, read in chunks."""
    total = np.zeros(store.d, dtype=np.float64)
    step = max(store.chunk_rows, 1)
    for lo in range(0, store.rows, step):
        total += store.read_rows(lo, min(store.rows, lo + step)).astype(np.float64).sum(0)
    return torch.from_numpy(total / store.rows)


# What `unsuperpose train` adds to summary.csv per SAE (the baselines repeat on every row).
SUMMARY_COLUMNS = (
    "ce_loss_recovered",
    "ce_loss_recovered_mean",
    "delta_ce",
    "delta_ce_se",
    "kl",
    "kl_div_score",
    "norm_ratio",
    "relative_reconstruction_bias",
)


def splice_columns(
    saes: dict, store, tokens: int, *, progress: bool = True, device: torch.device | str = "cpu"
) -> dict:
    """{key: summary columns} for SAEs trained on ``store``, on ``tokens`` predicted tokens of
    the LM's validation documents; {} (with a note) when the LM or its corpus cannot be found,
    so a trained grid is never lost to its evaluation."""
    from unsuperpose.lm import CorpusError, ModelError, load_bridge

    model_dir = Path(store.provenance.model_dir)
    try:
        blocks, _ = validation_blocks(
            model_dir, int(store.provenance.n_ctx), tokens, store.provenance.corpus
        )
        bridge = load_bridge(model_dir, device=device)
    except (SpliceError, ModelError, CorpusError, OSError) as exc:
        print(
            f"note: no spliced-in evaluation ({exc}); run `unsuperpose analyze splice` once the "
            "LM is back"
        )
        return {}
    names = {key: f"n{key[1]}-{key[0]:g}" for key in saes}  # internal: unique per key
    res = splice_eval(
        bridge,
        store.provenance.hook,
        blocks,
        {names[k]: (lambda x, s=s.to(device): s(x)[0]) for k, s in saes.items()},  # noqa: B008 (binds each SAE)
        mean=store_mean(store),
        progress=progress,
        device=device,
    )
    base = {
        "splice_tokens": res["tokens"],
        "ce_clean": res["ce_clean"],
        "ce_zero": res["ce_zero"],
        "ce_mean": res["ce_mean"],
    }
    return {k: {**{c: res["saes"][names[k]][c] for c in SUMMARY_COLUMNS}, **base} for k in saes}


def read_text_blocks(path: Path, n_ctx: int, tokenizer=None) -> list[np.ndarray]:
    """A local text file, documents separated by blank lines: each document packed as the LM's
    corpus is (``tokenizer``'s BOS, its tokens, its end-of-text; GPT-2's <|endoftext|> when
    None), concatenated, cut into blocks of ``n_ctx`` (the last one shorter)."""
    from unsuperpose.lm import gpt2_tokenizer

    if not path.is_file():
        raise SpliceError(
            f"corpus={str(path)!r}: no such file (a text file, documents separated by blank lines)"
        )
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if not docs:
        raise SpliceError(f"corpus={str(path)!r} holds no text")
    stream = [i for ids in (tokenizer or gpt2_tokenizer()).encode_documents(docs) for i in ids]
    blocks = [
        np.asarray(stream[i : i + n_ctx], dtype=np.int64) for i in range(0, len(stream), n_ctx)
    ]
    blocks = [b for b in blocks if len(b) >= 2]  # a block of one token predicts nothing
    if not blocks:
        raise SpliceError(f"corpus={str(path)!r} has fewer than two tokens")
    return blocks


def splice_dictionaries(
    dictionary: storage.Location,
    *,
    corpus: Path | None = None,
    tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    device: str = "cpu",
    show=str,
) -> dict:
    """``splice_eval`` of one dictionary or a dictionary set (a local folder) in the LM, hook and
    store its config.json recorded, on ``corpus`` (a local text file, used whole) or the LM's
    validation documents (``tokens`` predicted tokens, default ``DEFAULT_TOKENS``). Returns the
    record splice.json holds, its dictionaries' paths written by ``show``. A ``SpliceError``
    says why there is none (a folder without a dictionary, toy dictionaries, no text)."""
    from unsuperpose.analyze.features import find_saes
    from unsuperpose.harvest import ActivationStore
    from unsuperpose.lm import load_bridge
    from unsuperpose.train import load_dictionary

    try:
        sae_dirs = find_saes(dictionary)
    except FileNotFoundError as exc:  # no dictionary there
        raise SpliceError(str(exc)) from None
    saes = {p.name: load_dictionary(p) for p in sae_dirs}
    sources = {(s.config.get("source") or {}).get("path") for s in saes.values()}
    first = next(iter(saes.values())).config.get("source") or {}
    if first.get("kind") != "activation_store" or len(sources) != 1:
        raise SpliceError(
            f"{dictionary}: the spliced-in evaluation needs dictionaries trained on one "
            "LM activation store (toy dictionaries have no LM)"
        )
    if tokens is not None and tokens < 1:
        raise SpliceError(f"tokens={tokens} must be at least 1")
    model_dir = Path(first["model_dir"])
    store = ActivationStore(first["path"])
    hook, n_ctx = store.provenance.hook, int(store.provenance.n_ctx)
    if corpus is not None:
        from unsuperpose.lm import model_tokenizer

        blocks = read_text_blocks(corpus, n_ctx, model_tokenizer(model_dir))
        text = {"file": str(corpus.resolve())}
    else:
        blocks, text = validation_blocks(
            model_dir, n_ctx, tokens or DEFAULT_TOKENS, store.provenance.corpus
        )
    resolved = distributed.resolve_device(device)
    bridge = load_bridge(model_dir, device=resolved)
    result = splice_eval(
        bridge,
        hook,
        blocks,
        {k: (lambda x, s=s.to(resolved): s(x)[0]) for k, s in saes.items()},  # noqa: B008 (binds each SAE)
        mean=store_mean(store),
        batch_size=batch_size,
        progress=progress,
        device=resolved,
    )
    result.update(
        model_dir=str(model_dir),
        hook=hook,
        store=str(store.path),
        text=text,
        device=str(resolved),
        dictionaries={k: show(p) for k, p in zip(saes, sae_dirs)},
    )
    return result


def write_splice(out: storage.Location, result: dict) -> None:
    """``splice_dictionaries``' record written whole to ``out`` (a file or s3://...)."""
    if storage.is_remote(out):
        storage.write_json(out, result)
    else:
        write_json_atomic(out, result)
