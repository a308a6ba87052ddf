"""`unsuperpose harvest`: a saved LM + its corpus -> one activation store per hook.

The glue between ``lm`` (model, bridge, token blocks) and ``harvest`` (the streaming loop):
the corpus is the one the model was trained on unless corpus flags say otherwise, and so are its
validation documents, whose rows the stores mark as held out from SAE training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from unsuperpose import distributed, faults, locking, storage
from unsuperpose.commands.errors import flags_of, stage_errors
from unsuperpose.commands.flags import rename
from unsuperpose.config import add_arguments, from_args, to_dict
from unsuperpose.errors import UserError
from unsuperpose.harvest import (
    HarvestConfig,
    HarvestError,
    StoreError,
    harvest,
    kept_rows,
    planned_stores,
)
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
from unsuperpose.tracking import Tracker, default_wandb_mode


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
    add_arguments(p, CorpusConfig, default_text="the model's recorded corpus settings")
    rename(p, "--seed", "--split-seed")  # as in `lm`, where --seed is the training seed
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
FLAGS = flags_of(HarvestConfig, CorpusConfig, n_ctx="--n-ctx", seed="--split-seed")


def kept(args: argparse.Namespace) -> str:
    """What the stores keep across an I/O fault (the CLI's one-line error says it): each store's
    rows up to its recorded progress, whole chunks that the rerun continues after."""
    if storage.is_remote(args.out):  # the endpoint may be the fault: ask it nothing now
        return (
            f"in each store under {args.out}, the rows its zarr.json records as written "
            "(whole chunks); the rerun continues after them"
        )
    paths = planned_stores(from_args(HarvestConfig, args), model_info(args.lm)["n_layer"], args.out)
    parts = []
    for path in paths:
        prog = kept_rows(path)
        if prog is None:
            parts.append(f"{path.name} not started")
        elif prog.complete:
            parts.append(f"{path.name} complete")
        else:
            parts.append(f"{path.name} {prog.rows_written:,} of {prog.rows_planned:,} rows")
    return f"{', '.join(parts)} in {args.out} (whole chunks); the rerun continues after them"


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
    bridge = load_bridge(args.lm, device=placement.device)
    started = time.perf_counter()
    config = {"harvest": to_dict(cfg), "lm": info["path"], "corpus": to_dict(corpus)}
    with faults.writing(args.out), _tracked(args.out, info, config) as tracker:
        # (a fault no nearer code names happened under --out)
        paths = harvest(
            bridge,
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
        if tracker is not None:
            seconds = time.perf_counter() - started
            tracker.summary({"stores": [str(p) for p in paths], "seconds": round(seconds, 1)})
    for path in paths if distributed.is_main() else []:
        print(f"harvest: wrote {path}")
    return 0


@contextlib.contextmanager
def _tracked(out, info: dict, config: dict) -> Iterator[Tracker | None]:
    """The harvest's W&B run and log.jsonl, in the folder of its stores: its settings, then its
    stores and wall time. Rank 0 alone. A harvest into object storage has no local folder for
    them, so it is tracked only when W&B is online (its files then in a temporary folder)."""
    out = storage.location(out)
    if not distributed.is_main() or (storage.is_remote(out) and default_wandb_mode() != "online"):
        yield None
        return
    with contextlib.ExitStack() as stack:
        if storage.is_remote(out):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            folder = Path(out)
        name = f"harvest-{Path(info['path']).name}"
        yield stack.enter_context(Tracker(folder, name=name, config=config))
