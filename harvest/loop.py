"""The harvest loop: stream token blocks through a TransformerLens bridge into activation stores.

One forward pass serves every requested hook (one store each) and stops after the last block
any of them needs. Forward batches are always the same fixed slices of the blocks
(``[k*batch_size, (k+1)*batch_size)``), also when resuming, so a resumed store gets bit-for-bit
the rows an uninterrupted run computes. Stores started with different batch sizes therefore
cannot share a pass: each batch size gets its own.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unsuperpose import storage
from unsuperpose.config import field, to_dict
from unsuperpose.errors import UserError

from . import store
from .bf16 import torch_to_bf16
from .writer import ChunkWriter

DEFAULT_HOOK = "blocks.{layer}.mlp.hook_post"
CONFIG_FILE = "harvest_config.json"  # the HarvestConfig of the latest run, inside each store
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")


@dataclass
class HarvestConfig:
    """What to harvest: which layers and hook, how many tokens, how the store is chunked."""

    layer: str = field("1", help="layer index, comma-separated indices (1,3) or 'all'")
    hook: str = field(DEFAULT_HOOK, help="TransformerLens hook name; {layer} is replaced by each "
                      "layer (e.g. blocks.{layer}.hook_resid_post); a name without {layer} is "
                      "harvested as is")
    tokens: int | None = field(None, help="harvest at most this many tokens (default: the whole corpus)")
    batch_size: int = field(32, help="token blocks per forward pass")
    chunk_rows: int | None = field(None, help="rows per stored chunk (default: ~8 MiB of "
                                   "bfloat16, e.g. 4096 rows at width 1024)")
    split: str = field("all", help="which blocks of the corpus to harvest: all (its validation "
                       "documents' rows are marked held out from SAE training), train or val "
                       "(then the store's last chunks are held out instead)")
    force: bool = field(False, help="replace existing stores made from another model, corpus, "
                        "hook or token count instead of refusing")


@dataclass(frozen=True)
class _Target:
    """One hook to harvest into one store."""

    hook: str
    layer: int | None
    path: storage.Location  # a local folder or an object-store URL


def store_name(hook: str, layer: int | None) -> str:
    """``layer<L>.zarr`` for the default MLP hook (what the Makefile expects), else the hook name."""
    if layer is not None and hook == DEFAULT_HOOK.format(layer=layer):
        return f"layer{layer}.zarr"
    return f"{hook}.zarr"


def parse_layers(text: str, n_layer: int) -> list[int]:
    text = str(text).strip()
    if text == "all":
        return list(range(n_layer))
    try:
        layers = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--layer {text!r}: give a layer index, indices like 1,3, or 'all'") from None
    bad = [L for L in layers if not 0 <= L < n_layer]
    if not layers or bad:
        raise UserError(f"--layer {text!r}: this model has layers 0..{n_layer - 1}")
    return layers


def resolve_targets(cfg: HarvestConfig, hook_names: Any, n_layer: int,
                    out_dir: storage.Location) -> list[_Target]:
    """Hook templates + layers -> concrete hook names, each checked against the model's hooks."""
    if "{layer}" in cfg.hook:
        pairs = [(cfg.hook.format(layer=L), L) for L in parse_layers(cfg.layer, n_layer)]
    else:
        m = _BLOCK.match(cfg.hook)
        pairs = [(cfg.hook, int(m.group(1)) if m else None)]
    for hook, _ in pairs:
        if hook not in hook_names:
            close = difflib.get_close_matches(hook, list(hook_names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"--hook: the model has no hook point {hook!r}{hint}; its layers are "
                            f"0..{n_layer - 1} and its bridge offers: {', '.join(hook_templates(hook_names))}")
    return [_Target(h, L, storage.location(out_dir) / store_name(h, L)) for h, L in pairs]


def hook_templates(hook_names: Any) -> list[str]:
    """The bridge's hook names with the layer written ``{layer}`` (one entry per kind of hook),
    the usual SAE targets first."""
    names = sorted({_BLOCK.sub("blocks.{layer}.", h) for h in hook_names})
    usual = [h for h in (DEFAULT_HOOK, "blocks.{layer}.hook_resid_post", "blocks.{layer}.hook_attn_out",
                         "blocks.{layer}.hook_mlp_out") if h in names]
    return usual + [h for h in names if h not in usual]


def stop_hook(targets: list[_Target]) -> str | None:
    """The hook point after which the forward pass can stop (None: run the whole model).

    TransformerLens' ``stop_at_layer`` still computes the logits when the last block is needed,
    and the 50,257-way unembedding costs several times the blocks; ending the pass by raising
    from the output hook of the last needed block skips it in every case.
    """
    last = -1
    for t in targets:
        m = _BLOCK.match(t.hook)
        if m:
            last = max(last, int(m.group(1)))
        elif not t.hook.startswith(_EMBED):
            return None  # e.g. ln_final: past the last block
    return f"blocks.{max(last, 0)}.hook_out"


class _StopForward(Exception):
    """Raised by the stop hook once every needed activation has been captured."""


def _forward(bridge: Any, tokens: np.ndarray, hooks: list[str], stop: str | None) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
            got[name] = x.detach()
            return x
        return fn

    def halt(x: torch.Tensor, hook: Any) -> None:
        raise _StopForward

    # Registered after the captures, so a capture on the stop point itself still runs first.
    fwd_hooks = [(h, capture(h)) for h in hooks] + ([(stop, halt)] if stop else [])
    with torch.inference_mode():
        try:
            bridge.run_with_hooks(torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
                                  fwd_hooks=fwd_hooks)
        except _StopForward:
            pass
    return got


def mask_fingerprint(heldout: np.ndarray | None) -> str | None:
    """sha256 of a 0/1 held-out mask, read in pieces (it may be a memory map of the whole corpus)."""
    if heldout is None:
        return None
    flat, h = heldout.reshape(-1), hashlib.sha256()
    for i in range(0, len(flat), 1 << 26):
        h.update((flat[i:i + (1 << 26)] != 0).view(np.uint8))
    return h.hexdigest()


def _open_or_create(t: _Target, prov: store.Provenance, rows: int, chunk_rows: int,
                    batch_size: int, force: bool) -> tuple[Any, int, int]:
    """Returns (group, first row to write, forward batch size that keeps batches aligned)."""
    if force or not store.exists(t.path):
        return store.create(t.path, prov, rows, chunk_rows, batch_size), 0, batch_size
    group = store.open_group(t.path, mode="r+")
    if not store.has_heldout(group):
        return _old_store(t, group, prov, rows)
    store.check_same_source(t.path, store.provenance(group), prov)
    prog = store.progress(group)
    if prog.rows_planned > rows:
        what = "holds" if prog.complete else "is an unfinished harvest of"
        raise UserError(f"{t.path} {what} {prog.rows_planned:,} rows, more than the {rows:,} "
                        f"asked for; run with --tokens {prog.rows_planned} to keep it, or "
                        "--force to rewrite it")
    if prog.complete and prog.rows_planned == rows:
        return group, rows, prog.batch_size
    if prog.rows_planned < rows:
        store.grow(group, rows)  # a larger --tokens appends to a finished store
    return group, store.resume_row(prog), prog.batch_size


def _old_store(t: _Target, group: Any, prov: store.Provenance, rows: int) -> tuple[Any, int, int]:
    """A store from before the held-out array: kept as it is when finished, else refused.

    Its rows cannot be continued, since the earlier ones have no held-out marks to match.
    """
    # Its attributes lack the mask's fingerprint; everything else must still be the same.
    store.check_same_source(t.path, store.provenance(group),
                            replace(prov, heldout_fingerprint=None))
    prog = store.progress(group)
    if prog.complete and prog.rows_planned == rows:
        print(f"harvest: {t.path} predates held-out rows (no {store.HELDOUT!r} array): training "
              "will hold out its last chunks instead of the LM's validation documents; pass "
              "--force to harvest it again with them")
        return group, rows, prog.batch_size
    raise UserError(f"{t.path} was harvested before stores recorded held-out rows (it has no "
                    f"{store.HELDOUT!r} array), so it cannot be resumed or extended; run the same "
                    "command with --force to harvest it again")


def _print_plan(work: list[tuple[_Target, Any, int]], rows: int, out_dir: Path) -> None:
    need = 0
    for t, group, start in work:
        d = group[store.ACTS].shape[1]
        need += int((rows - start) * (2 * d / store.COMPRESSION_RATIO + 2))  # + tokens, positions
        print(f"harvest: {t.hook} -> {t.path} (width {d}, rows {start:,}..{rows:,})")
    free = storage.free_bytes(out_dir)
    if free is None:
        print(f"harvest: about {need / 2**30:.2f} GiB will be written to {out_dir} (object storage: "
              "free space is not checked)")
        return
    print(f"harvest: about {need / 2**30:.2f} GiB of disk needed, {free / 2**30:.1f} GiB free")
    if need > free:
        raise UserError(f"not enough disk under {out_dir}: about {need / 2**30:.2f} GiB needed, "
                        f"{free / 2**30:.1f} GiB free; use --tokens to harvest fewer")


def harvest(bridge: Any, blocks: np.ndarray, out_dir: str | Path, cfg: HarvestConfig, *,
            model_dir: str, weights_sha256: str, corpus_fingerprint: str,
            corpus: dict | None = None, heldout: np.ndarray | None = None,
            progress: bool = True) -> list[Path]:
    """Harvest ``cfg``'s hooks of ``bridge`` over ``blocks`` (N, n_ctx) into stores in ``out_dir``.

    ``heldout`` (the shape of ``blocks``, 0/1; ``TokenBlocks.val_mask``) marks the tokens of the
    LM's validation documents; each store records it per row, and SAE training never reads
    those rows. Resumes unfinished stores of the same provenance; returns the store paths.
    """
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.size == 0:
        raise UserError(f"token blocks must be a non-empty (N, n_ctx) array, got shape {blocks.shape}")
    heldout = None if heldout is None else np.asarray(heldout)
    if heldout is not None and heldout.shape != blocks.shape:
        raise ValueError(f"the held-out mask has shape {heldout.shape}, the blocks {blocks.shape}")
    n_ctx = blocks.shape[1]
    if cfg.tokens is not None and cfg.tokens < 1:
        raise UserError(f"--tokens {cfg.tokens}: give a positive number of tokens")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: give a positive number of blocks")
    rows = min(blocks.size, cfg.tokens or blocks.size)
    if cfg.tokens and cfg.tokens > blocks.size:
        print(f"harvest: the corpus has {blocks.size:,} tokens, fewer than --tokens {cfg.tokens:,}; "
              "harvesting all of them")
    n_layer = int(bridge.cfg.n_layers)
    out_dir = storage.location(out_dir)  # a local folder or s3://bucket/prefix
    storage.make_dirs(out_dir)
    targets = resolve_targets(cfg, bridge.hook_dict, n_layer, out_dir)
    hooks = [t.hook for t in targets]
    stop = stop_hook(targets)
    widths = {h: int(a.shape[-1]) for h, a in _forward(bridge, blocks[:1], hooks, stop).items()}

    heldout_fp = mask_fingerprint(heldout)
    work: dict[int, list] = {}  # forward batch size -> the stores whose rows were batched so
    for t in targets:
        prov = store.Provenance(model_dir=str(model_dir), weights_sha256=weights_sha256, hook=t.hook,
                                layer=t.layer, width=widths[t.hook], n_ctx=int(n_ctx),
                                corpus_fingerprint=corpus_fingerprint, corpus=corpus,
                                heldout_fingerprint=heldout_fp)
        chunk_rows = cfg.chunk_rows or store.default_chunk_rows(prov.width)
        group, start, stored_batch = _open_or_create(t, prov, rows, chunk_rows, cfg.batch_size, cfg.force)
        if start == rows:
            print(f"harvest: {t.path} is complete ({rows:,} rows); nothing to do")
            continue
        if stored_batch != cfg.batch_size:
            print(f"harvest: resuming {t.path} with its batch size {stored_batch} "
                  f"(not {cfg.batch_size}) so its rows match an uninterrupted run")
        storage.write_json(t.path / CONFIG_FILE, to_dict(cfg))  # zarr ignores files it does not know
        work.setdefault(stored_batch, []).append((t, group, start))
    if not work:
        return [t.path for t in targets]
    _print_plan([w for ws in work.values() for w in ws], rows, out_dir)
    if len(work) > 1:
        # Float sums depend on the batch shape, so one shared pass would change some stores' rows.
        sizes = "; ".join(f"batch size {b}: {', '.join(t.path.name for t, _, _ in ws)}"
                          for b, ws in work.items())
        print(f"harvest: the stores were started with different batch sizes ({sizes}); "
              f"each batch size gets its own pass over the corpus ({len(work)} passes)")
    for batch_size, ws in work.items():
        _stream(bridge, blocks, heldout, rows, ws, batch_size,
                stop_hook([t for t, _, _ in ws]), progress)
    return [t.path for t in targets]


def _stream(bridge: Any, blocks: np.ndarray, heldout: np.ndarray | None, rows: int, work: list,
            batch_size: int, stop: str | None, show: bool) -> None:
    n_ctx = blocks.shape[1]
    first = min(start for _, _, start in work)
    writers = [(t.hook, start, ChunkWriter(group, start, rows)) for t, group, start in work]
    batch_rows = batch_size * n_ctx
    bar = tqdm(total=rows, initial=first, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc="harvest", disable=not show)
    try:
        for b in range(first // batch_rows, -(-rows // batch_rows)):
            lo, hi = b * batch_rows, min(rows, (b + 1) * batch_rows)
            blk = blocks[b * batch_size:(b + 1) * batch_size]
            acts = _forward(bridge, blk, [h for h, _, _ in writers], stop)
            flat_tokens = blk.reshape(-1)[:hi - lo].astype(np.int32)
            positions = (np.arange(lo, hi) % n_ctx).astype(np.int32)
            marks = (np.zeros(hi - lo, np.uint8) if heldout is None else
                     (heldout[b * batch_size:(b + 1) * batch_size].reshape(-1)[:hi - lo] != 0)
                     .astype(np.uint8))
            for hook, start, writer in writers:
                skip = max(0, start - lo)  # rows this store already holds
                if skip >= hi - lo:
                    continue
                a = acts[hook].reshape(-1, acts[hook].shape[-1])[skip:hi - lo]
                writer.add(torch_to_bf16(a.to(torch.bfloat16)), flat_tokens[skip:], positions[skip:],
                           marks[skip:])
            bar.update(hi - max(lo, first))
    except BaseException:
        for _, _, writer in writers:
            writer.abort()
        raise
    finally:
        bar.close()
    for _, _, writer in writers:
        writer.close()
