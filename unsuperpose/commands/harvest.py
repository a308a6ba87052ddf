"""`unsuperpose harvest`: a saved LM + its corpus -> one activation store per hook.

The glue between ``lm`` (model, bridge, token blocks) and ``harvest`` (the streaming loop):
the corpus is the one the model was trained on unless corpus flags say otherwise, and so are its
validation documents, whose rows the stores mark as held out from SAE training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from unsuperpose import distributed, locking, storage
from unsuperpose.commands._errors import flags_of, stage_errors
from unsuperpose.config import add_arguments, from_args, to_dict
from unsuperpose.errors import UserError
from unsuperpose.harvest import HarvestConfig, HarvestError, StoreError, harvest, planned_stores
from unsuperpose.lm import (
    CorpusConfig,
    CorpusError,
    ModelError,
    check_n_ctx,
    load_bridge,
    model_info,
    model_tokenizer,
    token_blocks,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "harvest",
        help="stream an LM's hook activations into bfloat16 Zarr stores",
        description="Run the corpus through the LM and store one hook's activations per layer "
        "(OUT/layer<L>.zarr). Interrupted runs resume when run again.",
    )
    p.add_argument(
        "--lm",
        required=True,
        help="model directory (from `unsuperpose lm train` or `lm adopt`, or any "
        "saved causal LM TransformerLens 4 bridges, with its tokenizer), or a hub name such as "
        "EleutherAI/pythia-70m when online",
    )
    p.add_argument(
        "--out",
        required=True,
        type=storage.location,
        help="directory for the stores, or s3://bucket/prefix (needs "
        "'unsuperpose[s3]'; credentials and AWS_ENDPOINT_URL from the environment)",
    )
    p.add_argument(
        "--n-ctx",
        type=int,
        default=None,
        help="tokens per block (default: the model's context length)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="token cache (default: runs/cache/tokens or $UNSUPERPOSE_CACHE/tokens)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(p, HarvestConfig)
    # Corpus flags override the corpus recorded with the model (all default to it).
    add_arguments(p, CorpusConfig)
    p.set_defaults(func=run)


def _corpus(args: argparse.Namespace, info: dict) -> CorpusConfig:
    given = [f.name for f in dataclasses.fields(CorpusConfig) if hasattr(args, f.name)]
    if info.get("corpus") is None and not given:
        raise UserError(
            f"{args.lm} records no training corpus; name one with --corpus (e.g. --corpus wiki)"
        )
    with stage_errors(ValueError, FLAGS):  # the corpus config's own checks
        base = CorpusConfig(**info["corpus"]) if info.get("corpus") else CorpusConfig()
        return from_args(CorpusConfig, args, base=base)


# The keywords the stages' messages write (``layer='7'``, ``force=True``) -> this command's flags.
FLAGS = flags_of(HarvestConfig, CorpusConfig, n_ctx="--n-ctx")


def run(args: argparse.Namespace) -> int:
    cfg = from_args(HarvestConfig, args)
    placement = distributed.setup(cfg.device)  # under torchrun: joins the other ranks
    storage.check_access(args.out)  # a bucket that cannot be used fails before the model loads
    with stage_errors((ModelError, CorpusError, HarvestError, StoreError), FLAGS):
        info = model_info(args.lm)
        with contextlib.ExitStack() as locks:  # one writer per store (unsuperpose.locking)
            for path in planned_stores(cfg, info["n_layer"], args.out):
                locks.enter_context(locking.hold(path, what=f"the store {path}"))
            return _harvest(args, cfg, info, placement)


def _harvest(
    args: argparse.Namespace, cfg: HarvestConfig, info: dict, placement: distributed.Placement
) -> int:
    n_ctx = args.n_ctx or info["n_ctx"]
    check_n_ctx(info, n_ctx)
    corpus = _corpus(args, info)
    # The model's own tokenizer: its tag is in the corpus fingerprint and in the store's corpus
    # record.
    tokenizer = model_tokenizer(args.lm)
    # Rank 0 tokenises into the cache first; the other ranks then only read it.
    blocks = distributed.main_first(
        lambda: token_blocks(
            corpus, n_ctx, split=cfg.split, cache_dir=args.cache_dir, tokenizer=tokenizer
        )
    )
    paths = harvest(
        load_bridge(args.lm, device=placement.device),
        blocks.blocks,
        args.out,
        cfg,
        model_dir=info["path"],
        weights_sha256=info["weights_sha256"],
        corpus_fingerprint=blocks.fingerprint,
        corpus={**to_dict(corpus), "tokenizer": tokenizer.tag},
        heldout=blocks.val_mask,
        progress=not args.no_progress,
    )
    for path in paths if distributed.is_main() else []:
        print(f"harvest: wrote {path}")
    return 0
