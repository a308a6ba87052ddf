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
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from unsuperpose import distributed, storage
from unsuperpose.config import field, to_dict

from . import ranks, store
from .bf16 import torch_to_bf16
from .direct import DirectForward, disagreeing
from .store import StoreError
from .writer import ChunkWriter

DEFAULT_HOOK = "blocks.{layer}.mlp.hook_post"
CONFIG_FILE = "harvest_config.json"  # the HarvestConfig of the latest run, inside each store
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_EMBED = ("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")
PROBE_TOKENS = 16  # tokens of the first block that tell each hook's width before a harvest


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


@dataclass(frozen=True)
class _Target:
    """One hook to harvest into one store."""

    hook: str
    layer: int | None
    path: storage.Location  # a local folder or an object-store URL


def store_name(hook: str, layer: int | None) -> str:
    """``layer<L>.zarr`` for the default MLP hook (the Makefile expects it), else the hook name."""
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
        raise HarvestError(
            f"layer={text!r}: give a layer index, indices like 1,3, or 'all'"
        ) from None
    bad = [L for L in layers if not 0 <= L < n_layer]
    if not layers or bad:
        raise HarvestError(f"layer={text!r}: this model has layers 0..{n_layer - 1}")
    return layers


def _hooks(cfg: HarvestConfig, n_layer: int) -> list[tuple[str, int | None]]:
    """(hook name, layer) of every store ``cfg`` asks for."""
    if "{layer}" in cfg.hook:
        return [(cfg.hook.format(layer=L), L) for L in parse_layers(cfg.layer, n_layer)]
    m = _BLOCK.match(cfg.hook)
    return [(cfg.hook, int(m.group(1)) if m else None)]


def planned_stores(
    cfg: HarvestConfig, n_layer: int, out_dir: storage.Location
) -> list[storage.Location]:
    """The stores a harvest of ``cfg`` writes, known before the model is loaded (what the
    command locks first); its hooks are checked against the model later."""
    return [storage.location(out_dir) / store_name(h, L) for h, L in _hooks(cfg, n_layer)]


def resolve_targets(
    cfg: HarvestConfig, hook_names: Any, n_layer: int, out_dir: storage.Location
) -> list[_Target]:
    """Hook templates + layers -> concrete hook names, each checked against the model's hooks."""
    pairs = _hooks(cfg, n_layer)
    for hook, _ in pairs:
        if hook not in hook_names:
            close = difflib.get_close_matches(hook, list(hook_names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarvestError(
                f"the model has no hook point {hook!r}{hint} (hook={cfg.hook!r}); its layers "
                f"are 0..{n_layer - 1} and its bridge offers: "
                + ", ".join(hook_templates(hook_names))
            )
    return [_Target(h, L, storage.location(out_dir) / store_name(h, L)) for h, L in pairs]


def hook_templates(hook_names: Any) -> list[str]:
    """The bridge's hook names with the layer written ``{layer}`` (one entry per kind of hook),
    the usual SAE targets first."""
    names = sorted({_BLOCK.sub("blocks.{layer}.", h) for h in hook_names})
    usual = [
        h
        for h in (
            DEFAULT_HOOK,
            "blocks.{layer}.hook_resid_post",
            "blocks.{layer}.hook_attn_out",
            "blocks.{layer}.hook_mlp_out",
        )
        if h in names
    ]
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


def resolve_precision(asked: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA (tensor cores; stored values are bf16 anyway), fp32 on
    the CPU (no bf16 units here: autocast is several times slower, and today's bytes stay)."""
    if asked == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if asked not in ("fp32", "bf16"):
        raise HarvestError(f"precision={asked!r}: give auto, fp32 or bf16")
    return asked


def model_device(bridge: Any) -> torch.device:
    try:
        return next(bridge.parameters()).device
    except (AttributeError, StopIteration):  # a stand-in without parameters: it runs on the CPU
        return torch.device("cpu")


def _forward(
    bridge: Any,
    tokens: np.ndarray,
    hooks: list[str],
    stop: str | None,
    *,
    device: torch.device | None = None,
    precision: str = "fp32",
    direct: Callable[[torch.Tensor], dict] | None = None,
) -> dict[str, torch.Tensor]:
    """{hook: activation} of one batch: read on the plain HF model by ``direct``
    (:meth:`DirectForward.route`) when given, else through the bridge's hooks up to ``stop``."""
    ids, cast = _inputs(tokens, device, precision)
    with torch.inference_mode(), cast:
        if direct is not None:
            return direct(ids)
        return _bridge_forward(bridge, ids, hooks, stop)


def _inputs(tokens: np.ndarray, device: torch.device | None, precision: str) -> tuple:
    """(token ids on ``device``, the autocast context of ``precision``)."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    if device is not None and device.type != "cpu":
        ids = ids.to(device, non_blocking=True)
    # fp32 enters no autocast context at all, so the CPU path is exactly what it always was.
    cast = (
        torch.autocast(ids.device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    return ids, cast


def _bridge_forward(
    bridge: Any, ids: torch.Tensor, hooks: list[str], stop: str | None
) -> dict[str, torch.Tensor]:
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
    try:
        bridge.run_with_hooks(ids, fwd_hooks=fwd_hooks)
    except _StopForward:
        pass
    return got


def _probe(
    bridge: Any,
    tokens: np.ndarray,
    hooks: list[str],
    stop: str | None,
    device: torch.device,
    precision: str,
    viewer: DirectForward | None,
) -> tuple[dict[str, int], bool]:
    """(width of each hook, whether the harvest reads them on the plain HF model).

    The direct path is taken only where it gives the bridge's activations on these tokens: the
    bridge defines what a hook name means, the HF modules only compute it.
    """
    route = viewer.route(hooks) if viewer is not None else None
    got = _forward(bridge, tokens, hooks, stop, device=device, precision=precision, direct=route)
    if route is not None:
        ids, cast = _inputs(tokens, device, precision)
        with torch.inference_mode(), cast:  # not through _forward: that is one call per batch
            ref = _bridge_forward(bridge, ids, hooks, stop)
        bad = disagreeing(got, ref, precision)
        if bad:
            if distributed.is_main():
                print(
                    f"harvest: {', '.join(bad)} on the plain model differ from the bridge's; "
                    "reading every hook through the TransformerLens bridge (slower)"
                )
            got, route = ref, None
    return {h: int(a.shape[-1]) for h, a in got.items()}, route is not None


def _host_batches(
    bridge: Any,
    blocks: np.ndarray,
    batch_ids: list[int],
    batch_size: int,
    hooks: list[str],
    stop: str | None,
    device: torch.device,
    precision: str,
    direct: Callable[[torch.Tensor], dict] | None = None,
):
    """(b, {hook: bfloat16 NumPy (rows, d)}) for each forward batch b of ``batch_ids``, in order.

    On CUDA the device-to-host copy of batch b goes into pinned memory on a side stream and is
    handed out only after batch b+1's forward was launched, so the copy runs under that forward
    and the CPU packs chunks meanwhile. The arrays handed out are views of two reused pinned
    buffers: valid until the next item is taken.
    """

    def run(b: int) -> dict[str, torch.Tensor]:
        acts = _forward(
            bridge,
            blocks[b * batch_size : (b + 1) * batch_size],
            hooks,
            stop,
            device=device,
            precision=precision,
            direct=direct,
        )
        return {h: a.reshape(-1, a.shape[-1]).to(torch.bfloat16) for h, a in acts.items()}

    if device.type != "cuda":
        for b in batch_ids:
            yield b, {h: torch_to_bf16(a) for h, a in run(b).items()}
        return
    copier = torch.cuda.Stream(device)
    pinned: list[dict[str, torch.Tensor]] = [{}, {}]
    pending = None
    for i, b in enumerate(batch_ids):
        acts = run(b)
        copier.wait_stream(torch.cuda.current_stream(device))
        bufs, host = pinned[i % 2], {}
        with torch.cuda.stream(copier):
            for h, a in acts.items():
                if h not in bufs or bufs[h].shape[0] < a.shape[0]:
                    bufs[h] = torch.empty(a.shape, dtype=torch.bfloat16, pin_memory=True)
                bufs[h][: a.shape[0]].copy_(a, non_blocking=True)
                a.record_stream(copier)  # its memory must outlive the copy, not just the forward
                host[h] = bufs[h][: a.shape[0]]
        done = torch.cuda.Event()
        done.record(copier)
        if pending is not None:
            yield _landed(*pending)
        pending = (b, host, done)
    if pending is not None:
        yield _landed(*pending)


def _landed(b: int, host: dict[str, torch.Tensor], done: Any) -> tuple[int, dict[str, np.ndarray]]:
    done.synchronize()
    return b, {h: torch_to_bf16(t) for h, t in host.items()}


def mask_fingerprint(heldout: np.ndarray | None) -> str | None:
    """sha256 of a 0/1 held-out mask, read in pieces (it may memory-map the whole corpus)."""
    if heldout is None:
        return None
    flat, h = heldout.reshape(-1), hashlib.sha256()
    for i in range(0, len(flat), 1 << 26):
        h.update((flat[i : i + (1 << 26)] != 0).view(np.uint8))
    return h.hexdigest()


def _open_or_create(
    t: _Target,
    prov: store.Provenance,
    rows: int,
    chunk_rows: int,
    batch_size: int,
    force: bool,
    keep: Any = None,
) -> tuple[Any, int, int]:
    """Returns (group, first row to write, forward batch size that keeps batches aligned).

    ``keep(group)`` checks an existing store of this source before it is touched (it may refuse).
    """
    if force or not store.exists(t.path):
        return store.create(t.path, prov, rows, chunk_rows, batch_size), 0, batch_size
    group = store.open_group(t.path, mode="r+")
    if not store.has_heldout(group):
        return _old_store(t, group, prov, rows)
    store.check_same_source(t.path, store.provenance(group), prov)
    if keep is not None:
        keep(group)
    prog = store.progress(group)
    if not prog.complete:  # a killed run may have left a chunk write half done
        store.remove_interrupted_writes(t.path)
    if prog.rows_planned > rows:
        what = "holds" if prog.complete else "is an unfinished harvest of"
        raise StoreError(
            f"{t.path} {what} {prog.rows_planned:,} rows, more than the {rows:,} "
            f"asked for; harvest tokens={prog.rows_planned} to keep it, or "
            "rewrite it with force=True"
        )
    if prog.complete and prog.rows_planned == rows:
        return group, rows, prog.batch_size
    if prog.rows_planned < rows:
        store.grow(group, rows)  # a larger token budget appends to a finished store
    return group, store.resume_row(prog), prog.batch_size


def _old_store(t: _Target, group: Any, prov: store.Provenance, rows: int) -> tuple[Any, int, int]:
    """A store from before the held-out array: kept as it is when finished, else refused.

    Its rows cannot be continued, since the earlier ones have no held-out marks to match.
    """
    # Its attributes lack the mask's fingerprint; everything else must still be the same.
    store.check_same_source(
        t.path, store.provenance(group), replace(prov, heldout_fingerprint=None)
    )
    prog = store.progress(group)
    if prog.complete and prog.rows_planned == rows:
        print(
            f"harvest: {t.path} predates held-out rows (no {store.HELDOUT!r} array): training "
            "will hold out its last chunks instead of the LM's validation documents; harvest "
            "it again with force=True to record them"
        )
        return group, rows, prog.batch_size
    raise StoreError(
        f"{t.path} was harvested before stores recorded held-out rows (it has no "
        f"{store.HELDOUT!r} array), so it cannot be resumed or extended; harvest it again "
        "with force=True"
    )


def _print_plan(work: list[tuple[_Target, Any, int]], rows: int, out_dir: Path) -> None:
    need = 0
    for t, group, start in work:
        d = group[store.ACTS].shape[1]
        need += int((rows - start) * (2 * d / store.COMPRESSION_RATIO + 2))  # + tokens, positions
        print(f"harvest: {t.hook} -> {t.path} (width {d}, rows {start:,}..{rows:,})")
    free = storage.free_bytes(out_dir)
    if free is None:
        print(
            f"harvest: about {need / 2**30:.2f} GiB will be written to {out_dir} (object storage: "
            "free space is not checked)"
        )
        return
    print(f"harvest: about {need / 2**30:.2f} GiB of disk needed, {free / 2**30:.1f} GiB free")
    if need > free:
        raise HarvestError(
            f"not enough disk under {out_dir}: about {need / 2**30:.2f} GiB needed, "
            f"{free / 2**30:.1f} GiB free; harvest fewer tokens than tokens={rows}"
        )


def _plan_stores(
    targets: list[_Target],
    cfg: HarvestConfig,
    rows: int,
    widths: dict,
    n_ctx: int,
    precision: str,
    made: dict,
    out_dir: Any,
    *,
    model_dir: str,
    weights_sha256: str,
    corpus_fingerprint: str,
    corpus: dict | None,
    heldout_fp: str | None,
) -> dict:
    """Rank 0's part: open, create or grow each store and say which rows each pass writes."""
    asked = cfg.precision
    work: dict[tuple[int, str], list] = {}  # (batch size, precision) -> the stores computed so
    for t in targets:
        prov = store.Provenance(
            model_dir=str(model_dir),
            weights_sha256=weights_sha256,
            hook=t.hook,
            layer=t.layer,
            width=widths[t.hook],
            n_ctx=int(n_ctx),
            corpus_fingerprint=corpus_fingerprint,
            corpus=corpus,
            heldout_fingerprint=heldout_fp,
        )
        chunk_rows = cfg.chunk_rows or store.default_chunk_rows(prov.width)
        kept: dict[str, str] = {}  # the precision an existing store was started with
        group, start, stored_batch = _open_or_create(
            t,
            prov,
            rows,
            chunk_rows,
            cfg.batch_size,
            cfg.force,
            # called inside _open_or_create, within this iteration
            keep=lambda g: kept.setdefault("precision", _kept_precision(t, g, asked, precision)),  # noqa: B023
        )
        if start == rows:
            print(f"harvest: {t.path} is complete ({rows:,} rows); nothing to do")
            continue
        if stored_batch != cfg.batch_size:
            print(
                f"harvest: resuming {t.path} with its batch size {stored_batch} "
                f"(not {cfg.batch_size}) so its rows match an uninterrupted run"
            )
        prec = kept.get("precision", precision)
        cfg = replace(cfg, device=made["device"], precision=prec)  # the config says how it ran
        storage.write_json(
            t.path / CONFIG_FILE, to_dict(cfg)
        )  # zarr ignores files it does not know
        ranks.record_run(group, made, prec, start, rows)
        work.setdefault((stored_batch, prec), []).append((t, group, start))
    if not work:
        return work
    _print_plan([w for ws in work.values() for w in ws], rows, out_dir)
    if len(work) > 1:
        # Float sums depend on the batch shape, so one shared pass would change some stores' rows.
        precisions = {p for _, p in work}
        sizes = "; ".join(
            f"batch size {b}{f', {p}' if len(precisions) > 1 else ''}: "
            f"{', '.join(t.path.name for t, _, _ in ws)}"
            for (b, p), ws in work.items()
        )
        what = "batch sizes" if len(precisions) == 1 else "batch sizes or precisions"
        print(
            f"harvest: the stores were started with different {what} ({sizes}); "
            f"each gets its own pass over the corpus ({len(work)} passes)"
        )
    return work


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
    widths, use_direct = _probe(
        bridge, blocks[:1, :PROBE_TOKENS], hooks, stop, device, precision, viewer
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
        lambda: _plan_stores(
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
        shares = _stream(
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


def _kept_precision(t: _Target, group: Any, asked: str, precision: str) -> str:
    """The precision a store's rows are computed in: the one it was started with, as batch size.

    Mixing precisions in one store would give rows no single run computes. Stores from before
    the attribute existed were all computed in fp32.
    """
    had = group.attrs.get("precision") or ("fp32" if store.progress(group).rows_written else None)
    if had is None or had == precision:
        return precision
    if asked != "auto":
        raise StoreError(
            f"{t.path} was started with a {had} forward; continue it with precision={had!r} "
            f"(or auto), or harvest it again in {precision} with force=True"
        )
    print(
        f"harvest: continuing {t.path} in {had}, the precision it was started with "
        f"(not {precision}), so its rows match an uninterrupted run"
    )
    return had


def _stream(
    bridge: Any,
    blocks: np.ndarray,
    heldout: np.ndarray | None,
    rows: int,
    work: list,
    batch_size: int,
    precision: str,
    stop: str | None,
    show: bool,
    device: torch.device,
    direct: Callable[[torch.Tensor], dict] | None = None,
) -> dict:
    """Compute and write this rank's share of ``work``; returns what it did (for the record)."""
    n_ctx = blocks.shape[1]
    world, me = distributed.world_size(), distributed.rank()
    alone = world == 1
    first = min(start for _, _, start in work)
    batch_rows = batch_size * n_ctx
    unit = ranks.work_unit([store.progress(group).chunk_rows for _, group, _ in work], batch_rows)
    pieces = ranks.rank_pieces(first, rows, unit, batch_rows, me, world)
    rounds = ranks.n_rounds(first, rows, unit, world)
    valid = [store.progress(group).rows_written for _, group, _ in work]  # rank 0's record
    # Alone, the writer records each chunk as it lands (as it always did); under torchrun only
    # rank 0 records, and only rows every rank has finished.
    writers = [
        (t.hook, start, ChunkWriter(group, start, rows, record_progress=alone))
        for t, group, start in work
    ]
    bar = tqdm(
        total=rows,
        initial=first,
        unit="tok",
        unit_scale=True,
        dynamic_ncols=True,
        desc="harvest" if alone else f"harvest, {world} ranks",
        disable=not (show and distributed.is_main()),
    )
    queued = [0] * len(writers)  # each writer's chunks queued by the end of the previous round
    done = {"rank": me, "device": str(device), "forward_batches": 0, "rows": 0}

    def end_round(j: int) -> None:
        # Round j's chunks are queued; once every rank has round j-1's on disk, rank 0 records it.
        for (_, _, writer), n in zip(writers, queued):
            writer.wait_written(n)
        queued[:] = [writer.queued for _, _, writer in writers]
        distributed.barrier()
        if distributed.is_main():
            if j > 0:
                upto = ranks.round_rows(j - 1, first, rows, unit, world)[1]
                for i, (_, group, _) in enumerate(work):
                    if upto > valid[i]:
                        store.record_progress(group, upto, complete=False)
                        valid[i] = upto
            lo, hi = ranks.round_rows(j, first, rows, unit, world)
            bar.update(hi - lo)

    computed = _host_batches(
        bridge,
        blocks,
        sorted({b for _, b, _, _ in pieces}),
        batch_size,
        [h for h, _, _ in writers],
        stop,
        device,
        precision,
        direct,
    )
    ended, have, acts = 0, None, {}
    try:
        for rnd, b, lo, hi in pieces:
            while not alone and ended < rnd:
                end_round(ended)
                ended += 1
            if have != b:
                have, acts = next(computed)
                done["forward_batches"] += 1
            base = b * batch_rows
            blk = blocks[b * batch_size : (b + 1) * batch_size]
            flat_tokens = blk.reshape(-1)[lo - base : hi - base].astype(np.int32)
            positions = (np.arange(lo, hi) % n_ctx).astype(np.int32)
            marks = (
                np.zeros(hi - lo, np.uint8)
                if heldout is None
                else (
                    heldout[b * batch_size : (b + 1) * batch_size].reshape(-1)[
                        lo - base : hi - base
                    ]
                    != 0
                ).astype(np.uint8)
            )
            for hook, start, writer in writers:
                skip = max(0, start - lo)  # rows this store already holds
                if skip >= hi - lo:
                    continue
                if writer.row != lo + skip:
                    writer.seek(lo + skip)  # the rows in between are another rank's
                writer.add(
                    acts[hook][lo + skip - base : hi - base],
                    flat_tokens[skip:],
                    positions[skip:],
                    marks[skip:],
                )
            done["rows"] += hi - lo
            if alone:
                bar.update(hi - lo)
        while not alone and ended < rounds:  # a rank with no unit in the last rounds still syncs
            end_round(ended)
            ended += 1
    except BaseException:
        for _, _, writer in writers:
            writer.abort()
        raise
    finally:
        computed.close()
        bar.close()
    for _, _, writer in writers:
        writer.close()
    if not alone:
        distributed.barrier()  # every rank's last chunks are on disk
        if distributed.is_main():
            for _, group, _ in work:
                store.record_progress(group, rows, complete=True)
    return done
