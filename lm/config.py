"""The LM's architecture and training knobs, and the named presets that fill them.

Presets: ``tiny`` is the follow-up's minuscule LM (6 layers, d_model 16, MLP 64), trained with a
CPU-sized batch so the ~10-minute default budget buys hundreds of optimizer steps; ``small`` is
the report's LM (6 layers, d_model 256, MLP 1024) with the same CPU batch; ``report`` is that LM
with the report's batch of 256 sequences (gradient accumulation over micro-batches). Every field
stays overridable by its own flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from unsuperpose.config import field


@dataclass
class LMConfig:
    """Architecture of the GPT-2-style decoder (GELU, learned positions, LayerNorm, 50,257 tokens)."""  # noqa: E501 (--help prints this line)

    preset: str = field(
        "tiny", help="architecture preset it was built from: tiny | small (report uses small)"
    )
    n_layer: int = field(6, help="transformer blocks")
    d_model: int = field(16, help="residual stream width")
    n_head: int = field(4, help="attention heads (must divide d_model)")
    d_mlp: int = field(64, help="MLP hidden width: the activations the SAEs learn from")
    n_ctx: int = field(
        256, help="context length: learned positions, and the length of every token block"
    )
    activation: str = field(
        "gelu_new", help="MLP nonlinearity (GPT-2's tanh-approximated GELU by default)"
    )
    dropout: float = field(0.0, help="dropout on embeddings, attention and residual branches")

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "d_mlp", "n_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide d_model={self.d_model}")
        if self.n_ctx < 2:
            raise ValueError(f"n_ctx={self.n_ctx}: must be at least 2")


@dataclass
class TrainLMConfig:
    """How to train: budget, batch, AdamW with 1% linear warm-up then cosine decay, logging, checkpoints."""  # noqa: E501 (--help prints this line)

    tokens: int = field(
        1_000_000, help="training budget in tokens (sets the number of optimizer steps)"
    )
    batch_size: int = field(
        8,
        help="sequences per optimizer step: 8 on CPU so a short budget buys enough steps "
        "(the report used 256: --preset report)",
    )
    micro_batch: int = field(
        8, help="sequences per forward/backward; batch_size/micro_batch steps are accumulated"
    )
    lr: float = field(1e-2, help="peak learning rate")
    min_lr_fraction: float = field(
        0.1, help="the cosine decays to this fraction of the peak learning rate"
    )
    warmup_fraction: float = field(0.01, help="fraction of steps of linear warm-up")
    weight_decay: float = field(
        0.1,
        help="AdamW weight decay, on weight matrices and embeddings "
        "(not biases or LayerNorm gains)",
    )
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    grad_clip: float = field(1.0, help="clip the gradient's global norm to this (0 = off)")
    seed: int = field(0, help="seed of the initial weights, data order and dropout")
    eval_every: int = field(
        100, help="steps between validation losses (on at most --eval-blocks blocks)"
    )
    eval_blocks: int = field(
        64, help="validation blocks used at intervals; the final validation uses all"
    )
    checkpoint_every: int = field(
        100, help="steps between checkpoints (resume by running the same command again)"
    )
    stop_at_step: int | None = field(
        None,
        help="stop with a checkpoint after this step without changing the "
        "schedule; run again to continue (splits a long run into sessions)",
    )
    loss_chunk: int = field(
        256, help="tokens per slice of the output layer's loss (memory vs. speed)"
    )
    threads: int | None = field(None, help="torch CPU threads (default: torch's choice, all cores)")
    device: str = field(
        "auto", help="cuda, cuda:N, cpu or auto (the GPU when one is visible, else the CPU)"
    )
    wandb: Literal["offline", "online", "disabled"] | None = field(
        None, help="W&B mode: offline (default, or $WANDB_MODE), online (needs a login) or disabled"
    )
    token_cache: str | None = field(
        None,
        help="folder of the tokenised-corpus cache (default runs/cache/tokens "
        "or $UNSUPERPOSE_CACHE/tokens)",
    )

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.batch_size < 1 or self.micro_batch < 1:
            raise ValueError(
                f"tokens={self.tokens}, batch_size={self.batch_size} and "
                f"micro_batch={self.micro_batch}: each must be positive"
            )
        if self.batch_size % self.micro_batch:
            raise ValueError(
                f"micro_batch={self.micro_batch} must divide batch_size={self.batch_size}"
            )
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_fraction <= 1:
            raise ValueError(
                f"warmup_fraction={self.warmup_fraction} must be in [0, 1) and "
                f"min_lr_fraction={self.min_lr_fraction} in [0, 1]"
            )
        if (
            self.eval_every < 1
            or self.checkpoint_every < 1
            or self.eval_blocks < 1
            or self.loss_chunk < 1
        ):
            raise ValueError(
                f"eval_every={self.eval_every}, eval_blocks={self.eval_blocks}, "
                f"checkpoint_every={self.checkpoint_every} and loss_chunk={self.loss_chunk}: "
                "each must be positive"
            )


_TINY = LMConfig()
_SMALL = dataclasses.replace(_TINY, preset="small", d_model=256, d_mlp=1024)

# tiny: 2.5M tokens (about 2.5 passes over the embedded Wikipedia text) in batches of 8 sequences
# buys ~1,220 optimizer steps in the ~10-minute `make lm` budget (measured on a quiet machine:
# 3M tokens trained in 650 s to a validation loss of 6.04 nats/token, 1M tokens gave 6.52; the
# corpus unigram entropy is 7.33). All cores: on a quiet 2-core machine two
# threads trained at 5,155 tokens/s against 2,974 for one (bench_lm, load 0.9); only when other
# jobs oversubscribe the cores does one thread win (2-4x) -- then pass --threads 1.
PRESETS: dict[str, tuple[LMConfig, TrainLMConfig]] = {
    "tiny": (_TINY, TrainLMConfig(tokens=2_500_000)),
    "small": (_SMALL, TrainLMConfig(lr=2e-3)),
    "report": (_SMALL, TrainLMConfig(tokens=20_000_000, batch_size=256, micro_batch=16, lr=1e-3)),
}


def preset(name: str) -> tuple[LMConfig, TrainLMConfig]:
    """The (architecture, training) pair of a named preset; a ValueError names the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    lm, train = PRESETS[name]
    return dataclasses.replace(lm), dataclasses.replace(train)
