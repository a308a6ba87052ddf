"""Stage 1: corpus -> tokens -> a small GPT-2-style LM trained here, or any causal LM
TransformerLens 4 bridges (Pythia, Llama, ...) brought along with its own tokenizer.

Everything the later stages need from the LM goes through these names: the tokenizer, the token
blocks (the very blocks harvesting streams), and a model directory that plain transformers and
TransformerLens both load offline.
"""

from unsuperpose.lm.adopt import adopt_model
from unsuperpose.lm.config import PRESETS, LMConfig, TrainLMConfig, preset
from unsuperpose.lm.corpus import CorpusConfig, iter_documents
from unsuperpose.lm.errors import CorpusError, ModelError, RunExists
from unsuperpose.lm.loss import chunked_lm_loss, model_loss
from unsuperpose.lm.model import (
    build_model,
    check_n_ctx,
    load_bridge,
    load_model,
    model_info,
    model_lm_config,
    model_tokenizer,
    resolve_model,
    save_model,
)
from unsuperpose.lm.tokenizer import (
    EOT_ID,
    VOCAB_SIZE,
    ModelTokenizer,
    get_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
)
from unsuperpose.lm.tokens import (
    TokenBlocks,
    default_cache_dir,
    describe_tokens,
    token_blocks,
    unigram_entropy,
)
from unsuperpose.lm.train import evaluate, train_lm

__all__ = [
    "CorpusConfig",
    "CorpusError",
    "EOT_ID",
    "LMConfig",
    "ModelError",
    "ModelTokenizer",
    "PRESETS",
    "RunExists",
    "TokenBlocks",
    "TrainLMConfig",
    "VOCAB_SIZE",
    "adopt_model",
    "build_model",
    "check_n_ctx",
    "chunked_lm_loss",
    "default_cache_dir",
    "describe_tokens",
    "evaluate",
    "get_tokenizer",
    "gpt2_tokenizer",
    "iter_documents",
    "load_bridge",
    "load_model",
    "load_tokenizer",
    "model_info",
    "model_lm_config",
    "model_loss",
    "model_tokenizer",
    "preset",
    "resolve_model",
    "save_model",
    "token_blocks",
    "train_lm",
    "unigram_entropy",
]
