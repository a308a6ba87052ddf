"""Adopting an existing causal LM as a pipeline model: a transformers folder or hub name
(``model.py``'s loaders) or a GGUF file (``gguf.py``). Apart from both, so that neither imports
the other: the GGUF path saves through ``model.save_model``.
"""

from __future__ import annotations

from pathlib import Path

from unsuperpose.lm.corpus import CorpusConfig
from unsuperpose.lm.gguf import adopt_gguf, is_gguf_spec
from unsuperpose.lm.model import load_model, model_tokenizer, resolve_model, save_model


def adopt_model(
    from_dir: str | Path, out_dir: str | Path, *, corpus: CorpusConfig | None = None
) -> Path:
    """Make an existing causal LM a pipeline model: validated, re-saved with its own tokenizer and
    our files. ``from_dir``: a local HF directory, a hub name, or a GGUF (``gguf:PATH``, or a
    packaged model's name such as ``smollm2``; see :mod:`unsuperpose.lm.gguf`)."""
    if is_gguf_spec(from_dir):
        return adopt_gguf(from_dir, out_dir, corpus=corpus)
    src = resolve_model(from_dir)
    tokenizer = model_tokenizer(src)  # before the weights: a missing tokenizer is the cheaper error
    model = load_model(src)
    extra = {"adopted_from": str(from_dir) if not Path(from_dir).exists() else str(src.resolve())}
    return save_model(model, out_dir, corpus=corpus, extra=extra, tokenizer=tokenizer)
