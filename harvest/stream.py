"""The stream: forward passes over fixed batches of token blocks, their activations handed to
the host as bfloat16 rows, and this rank's share of the rows written into the stores' chunks.

``forward`` reads one batch's hooks on the plain HF model (``direct.py``) or through the bridge
up to the stop hook; ``probe`` tells the widths and which path to take; ``host_batches``
overlaps a batch's copy to the host with the next forward on CUDA; ``stream_rows`` writes the
rows, round by round under torchrun (``ranks.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from unsuperpose import distributed

from . import ranks, store
from .bf16 import torch_to_bf16
from .config import HarvestError
from .direct import DirectForward, disagreeing
from .writer import ChunkWriter

PROBE_TOKENS = 16  # tokens of the first block that tell each hook's width before a harvest


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


def forward(
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


def probe(
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
    got = forward(bridge, tokens, hooks, stop, device=device, precision=precision, direct=route)
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


def host_batches(
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
        acts = forward(
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


def stream_rows(
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

    computed = host_batches(
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
