"""What a harvest is asked for (``HarvestConfig``) and its refusal (``HarvestError``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unsuperpose import distributed
from unsuperpose.config import field

DEFAULT_HOOK = "blocks.{layer}.mlp.hook_post"


class HarvestError(ValueError):
    """A harvest that cannot run as configured: layers or a hook the model lacks, a budget the
    disk cannot hold, settings out of range. (A store in the way raises ``StoreError``.)"""


@dataclass
class HarvestConfig:
    """What to harvest: which layers and hook, how many tokens, how the store is chunked."""

    layer: str = field("1", help="layer index, comma-separated indices (1,3) or 'all'")
    hook: str = field(
        DEFAULT_HOOK,
        help="TransformerLens hook name; {layer} is replaced by each "
        "layer (e.g. blocks.{layer}.hook_resid_post); a name without {layer} is "
        "harvested as is",
    )
    tokens: int | None = field(
        None, help="harvest at most this many tokens (default: the whole corpus)"
    )
    batch_size: int = field(32, help="token blocks per forward pass")
    chunk_rows: int | None = field(
        None,
        help="rows per stored chunk (default: ~8 MiB of bfloat16, e.g. 4096 rows at width 1024)",
    )
    split: str = field(
        "all",
        help="which blocks of the corpus to harvest: all (its validation "
        "documents' rows are marked held out from SAE training), train or val "
        "(then the store's last chunks are held out instead)",
    )
    force: bool = field(
        False,
        help="replace existing stores made from another model, corpus, "
        "hook or token count instead of refusing",
    )
    device: str = field("auto", help=distributed.DEVICE_HELP)
    precision: Literal["auto", "fp32", "bf16"] = field(
        "auto",
        help="forward precision: auto (bf16 autocast on CUDA, fp32 on "
        "the CPU), fp32, or bf16 (autocast; on a CPU it is slow and only for "
        "comparing); a store keeps the precision it was started with",
    )
