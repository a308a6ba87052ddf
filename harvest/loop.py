"""The harvest loop: stream token blocks through an LM into activation stores.

Hook points are named as TransformerLens names them, and read on the plain Hugging Face model
the bridge wraps (``direct.py``: the bridge's own components add work to every batch), where the
bridge's value is simply an HF module's input or output; other hooks go through the bridge. One
forward pass serves every requested hook (one store each) and stops as soon as the last one is
read (through the bridge: after the last block any of them needs).

Forward batches are always the same fixed slices of the blocks
(``[k*batch_size, (k+1)*batch_size)``), also when resuming, so a resumed store gets bit-for-bit
the rows an uninterrupted run computes. Stores started with different batch sizes therefore
cannot share a pass: each batch size gets its own. (A store begun before the plain-model path
existed was computed through the bridge, with eager attention; its resumed rows agree with its
first ones to float rounding, not bit for bit.)

Under torchrun the rows are cut into work units of whole chunks of every store (``work_unit``);
in round j rank r harvests unit j*W+r, computing the forward batches that overlap it (a batch
that straddles two ranks' units is computed by both: the same slice gives the same rows). After
each round rank 0 alone records how far the store is valid, so the store keeps the one-process
invariant (a valid prefix, at worst stray chunks after it) and resumes with any number of ranks.

The parts: ``config.py`` (what is asked), ``hooks.py`` (which hooks, which stores), ``plan.py``
(open, create, grow, resume), ``stream.py`` (forward passes and the rows written); this module
runs them in order. The names users import from here (``HarvestConfig``, ``store_name``, ...)
still are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unsuperpose import distributed, storage
from unsuperpose.config import to_dict

from . import ranks, stream
from .config import DEFAULT_HOOK, HarvestConfig, HarvestError
from .direct import DirectForward
from .hooks import (
    Target,
    hook_templates,
    parse_layers,
    planned_stores,
    resolve_targets,
    stop_hook,
    store_name,
)
from .plan import CONFIG_FILE, mask_fingerprint, plan_stores
from .stream import model_device, resolve_precision

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_HOOK",
    "HarvestConfig",
    "HarvestError",
    "Target",
    "harvest",
    "hook_templates",
    "mask_fingerprint",
    "model_device",
    "parse_layers",
    "planned_stores",
    "resolve_precision",
    "resolve_targets",
    "stop_hook",
    "store_name",
]


def harvest(
    bridge: Any,
    blocks: np.ndarray,
    out_dir: str | Path,
    cfg: HarvestConfig,
    *,
    model_dir: str,
    weights_sha256: str,
    corpus_fingerprint: str,
    corpus: dict | None = None,
    heldout: np.ndarray | None = None,
    progress: bool = True,
) -> list[Path]:
    """Harvest ``cfg``'s hooks of ``bridge`` over ``blocks`` (N, n_ctx) into stores in ``out_dir``.

    ``heldout`` (the shape of ``blocks``, 0/1; ``TokenBlocks.val_mask``) marks the tokens of the
    LM's validation documents; each store records it per row, and SAE training never reads
    those rows. Resumes unfinished stores of the same provenance; returns the store paths.
    """
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.size == 0:
        raise HarvestError(
            f"token blocks must be a non-empty (N, n_ctx) array, got shape {blocks.shape}"
        )
    heldout = None if heldout is None else np.asarray(heldout)
    if heldout is not None and heldout.shape != blocks.shape:
        raise ValueError(f"the held-out mask has shape {heldout.shape}, the blocks {blocks.shape}")
    n_ctx = blocks.shape[1]
    if cfg.tokens is not None and cfg.tokens < 1:
        raise HarvestError(f"tokens={cfg.tokens}: give a positive number of tokens")
    if cfg.batch_size < 1:
        raise HarvestError(f"batch_size={cfg.batch_size}: give a positive number of blocks")
    rows = min(blocks.size, cfg.tokens or blocks.size)
    if cfg.tokens and cfg.tokens > blocks.size and distributed.is_main():
        print(
            f"harvest: the corpus has {blocks.size:,} tokens, fewer than the {cfg.tokens:,} "
            "asked for; harvesting all of them"
        )
    n_layer = int(bridge.cfg.n_layers)
    out_dir = storage.location(out_dir)  # a local folder or s3://bucket/prefix
    storage.make_dirs(out_dir)
    targets = resolve_targets(cfg, bridge.hook_dict, n_layer, out_dir)
    hooks = [t.hook for t in targets]
    stop = stop_hook(targets)
    device = model_device(bridge)
    precision = resolve_precision(cfg.precision, device)
    viewer = DirectForward.of(bridge)
    # A few tokens tell the widths and whether both paths agree; a whole block would be a
    # fixed cost that small harvests of a large model notice.
    widths, use_direct = stream.probe(
        bridge, blocks[:1, : stream.PROBE_TOKENS], hooks, stop, device, precision, viewer
    )

    heldout_fp = mask_fingerprint(heldout)
    distributed.check_same_everywhere(
        "the harvest settings",
        {
            "config": to_dict(cfg),
            "out": str(out_dir),
            "rows": rows,
            "n_ctx": int(n_ctx),
            "precision": precision,
            "weights_sha256": weights_sha256,
            "corpus_fingerprint": corpus_fingerprint,
            "heldout_fingerprint": heldout_fp,
        },
    )
    made = {
        "world_size": distributed.world_size(),
        "device": str(device),
        "device_name": distributed.device_name(device),
        "forward": "hf" if use_direct else "bridge",
    }  # rank 0's; each rank's is in the runs
    work = ranks.shared_plan(
        targets,
        lambda: plan_stores(
            targets,
            cfg,
            rows,
            widths,
            n_ctx,
            precision,
            made,
            out_dir,
            model_dir=model_dir,
            weights_sha256=weights_sha256,
            corpus_fingerprint=corpus_fingerprint,
            corpus=corpus,
            heldout_fp=heldout_fp,
        ),
    )
    if not work:
        return [t.path for t in targets]
    for (batch_size, prec), ws in work.items():
        shares = stream.stream_rows(
            bridge,
            blocks,
            heldout,
            rows,
            ws,
            batch_size,
            prec,
            stop_hook([t for t, _, _ in ws]),
            progress,
            device,
            viewer.route([t.hook for t, _, _ in ws]) if use_direct else None,
        )
        shares = distributed.all_gather_objects(shares)
        if distributed.is_main():
            ranks.record_shares([group for _, group, _ in ws], shares)
    return [t.path for t in targets]
