"""The spliced-in evaluation of dictionaries trained on an LM's activation store: the LM's
validation documents as token blocks, the store's mean (for mean ablation), and the columns
``unsuperpose train`` adds to summary.csv per dictionary (``splice_columns``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from unsuperpose.analyze.splice import splice_eval


class SpliceError(ValueError):
    """No text to splice on: the LM records no corpus, or held out no documents (the message
    says to pass a text file instead, ``--corpus`` on the command line)."""


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
            "documents are unknown; pass a text file with --corpus"
        )
    cfg = CorpusConfig(**corpus)
    if cfg.val_fraction == 0:
        raise SpliceError(
            f"{model_dir} was trained with --val-fraction 0 (no held-out documents); pass "
            "a text file with --corpus"
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
