"""Train a grid of SAEs (L1 values x dictionary sizes) on one activation source, in one pass.

Every SAE sees the same batches in the same order. All SAEs of a size are one stacked group of
the run's architecture (``train.families``: stacked parameters, one encoder GEMM); one Adam
updates every group's tensors. Adam is elementwise, so stacking changes nothing: each SAE ends
as it would trained alone with the same init seed and batches (tested against ``SAE`` +
``torch.optim.Adam``). Within a grid, which is one architecture, an SAE's key is
(sparsity value, dictionary size); what is written names the architecture too.

``train`` knows nothing of toy data or LMs. Whatever the caller wants measured during training
(e.g. MMCS with the toy ground truth) comes in as a callback.

Devices and processes: a state lives on one device (``new_state(..., device=)``) and the batches
are moved there as they come (``to_device``). Under torchrun each rank holds its share of the
grid (``train.parallel``); the loop below is the same for every rank, and the only places ranks
talk are the log steps (one gathered record), the data-parallel gradient average and per-step
reductions (``parallel.reduce_step``), checkpoints and the end. No group talks to other ranks.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from unsuperpose import distributed
from unsuperpose.train import parallel
from unsuperpose.train.config import SAETrainConfig
from unsuperpose.train.families.stacked import StackedGroup
from unsuperpose.train.fitted import evaluate_dictionaries
from unsuperpose.train.heldout import heldout_rows, score
from unsuperpose.train.losses import l1_divisor
from unsuperpose.train.registry import Family, get_family
from unsuperpose.train.resample import resample_dead, resample_generator
from unsuperpose.train.source import ActivationSource, check_source

# A callback gets the step and {(sparsity, dict_size): unit-norm dictionary (n, d)} and returns
# {(sparsity, dict_size): {metric: value}}; the trainer adds the values to its history.
Dictionaries = dict[tuple[float, int], torch.Tensor]
CallbackFn = Callable[[int, Dictionaries], dict[tuple[float, int], dict[str, float]]]


@dataclass
class Callback:
    every: int
    fn: CallbackFn


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or Inf; the message names the SAE and the step."""


@dataclass
class GridState:
    """Everything a run needs to continue exactly: step, parameters, Adam, dead counters."""

    config: SAETrainConfig
    d: int
    groups: list[StackedGroup]
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict] = field(default_factory=list)
    source_fingerprint: str | None = None  # the data's identity, kept with every checkpoint
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharding: parallel.Sharding | None = None  # None: one process, the whole grid
    # Filled by ``evaluate``, written by ``io.save_grid`` beside each dictionary: per latent, its
    # fires on the held-out rows and the training steps since it last fired, so analysis can
    # read firing rates and dead latents at any window after the fact.
    latents: dict[tuple[float, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def group_ids(self) -> list[int]:
        """Each local group's index in the whole grid (sizes sorted): checkpoints use these."""
        return list(self.sharding.owned) if self.sharding else list(range(len(self.groups)))

    @property
    def family(self) -> Family:
        return get_family(self.config.arch)

    def keys(self) -> list[tuple[float, int]]:
        return [(v, g.n) for g in self.groups for v in g.values]

    def saes(self) -> dict[tuple[float, int], object]:
        """Every dictionary of the grid as the class it is saved as (effective weights, copied)."""
        return {(v, g.n): g.dictionary(s) for g in self.groups for s, v in enumerate(g.values)}

    def dictionaries(self) -> Dictionaries:
        out = {}
        for g in self.groups:
            dn = g.dictionaries()
            for s, v in enumerate(g.values):
                out[(v, g.n)] = dn[s]
        return out


def data_sample(source: ActivationSource, rows: int, seed: int) -> torch.Tensor:
    """``rows`` activations from a stream of their own (for data-initialised decoders)."""
    return next(source.batches(rows, seed=seed + _INIT_STREAM))


def new_state(
    source: ActivationSource,
    config: SAETrainConfig,
    *,
    device: torch.device | str = "cpu",
    sharding: parallel.Sharding | None = None,
) -> GridState:
    """A fresh grid on ``device``; with ``sharding``, only this rank's share of it."""
    source = check_source(source)
    d = int(source.d)
    device = distributed.with_index(device)
    sizes = sorted(config.dict_sizes)
    owned = sharding.owned if sharding else range(len(sizes))
    init_data = (
        data_sample(source, max(config.dict_sizes), config.seed)
        if config.decoder_init == "data"
        else None
    )
    family = get_family(config.arch)
    groups = [
        family.group(
            d, sizes[i], config.sparsity, config, seed=config.seed, data=init_data, device=device
        )
        for i in owned
    ]
    params = [t for g in groups for t in g.parameters()]
    optimizer = torch.optim.Adam(
        params, lr=config.lr, betas=(config.beta1, config.beta2), fused=True
    )
    describe = getattr(source, "describe", None)
    fingerprint = describe().get("fingerprint") if callable(describe) else None
    return GridState(
        config=config,
        d=d,
        groups=groups,
        optimizer=optimizer,
        source_fingerprint=fingerprint,
        device=device,
        sharding=sharding,
    )


def to_device(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """The source's batches on ``device``. For a GPU each CPU batch is pinned and copied on a
    side stream, so the copy of batch k+1 runs while the GPU still computes step k; the compute
    stream waits for that copy only when it needs the batch."""
    device = distributed.with_index(device)
    try:
        if device.type != "cuda":
            for x in batches:
                yield x.to(device)
            return
        copy_stream = torch.cuda.Stream(device)
        for x in batches:
            if x.is_cuda:  # generated on a GPU (the toy source there): nothing to pin
                yield x.to(device)
                continue
            with torch.cuda.stream(copy_stream):
                y = x.pin_memory().to(device, non_blocking=True)
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(copy_stream)
            y.record_stream(compute)  # its memory is not reused before the compute stream is done
            yield y
    finally:
        if hasattr(batches, "close"):
            batches.close()


def _raise_if_bad(g: StackedGroup, bad: torch.Tensor, what: str) -> None:
    """``bad``: (S,) flags of group ``g``; the error names the first flagged SAE."""
    if bad.any():
        value = g.values[int(bad.nonzero()[0, 0])]
        knob = get_family(g.arch).knob.label
        raise NonFiniteLoss(
            f"{g.arch} SAE with {knob} {value:g} and {g.n} latents {what}; try a lower learning "
            "rate or check the data for NaN/Inf"
        )


def check_finite_parameters(state: GridState) -> None:
    """Raise NonFiniteLoss naming the first SAE whose weights hold a NaN or Inf."""
    for g in state.groups:
        _raise_if_bad(g, g.nonfinite(), f"has non-finite weights at step {state.step}")


def _check_finite(state: GridState, stats: list[dict[str, torch.Tensor]]) -> None:
    for g, st in zip(state.groups, stats):
        _raise_if_bad(
            g,
            ~torch.isfinite(st["mse"] + st["l1"]),
            f"got a non-finite loss before step {state.step}",
        )


def train_steps(
    state: GridState,
    source: ActivationSource,
    *,
    until: int | None = None,
    callbacks: Iterable[Callback] = (),
    on_log: Callable[[dict], None] | None = None,
    on_step: Callable[[GridState], None] | None = None,
    progress: bool = True,
) -> GridState:
    """Advance ``state`` to step ``until`` (default: config.steps) on the source's batch stream.

    The stream restarts at ``state.step``, so a state restored from a checkpoint continues
    exactly where it stopped.
    """
    cfg = state.config
    sharding = state.sharding
    until = cfg.steps if until is None else until
    # Data parallel: every rank holds the same SAEs, so rank 0 alone measures them.
    callbacks = (
        list(callbacks) if not (sharding and sharding.data_parallel and sharding.rank) else []
    )
    params = [t for g in state.groups for t in g.parameters()]
    if state.step == 0:
        _run_callbacks(state, callbacks, force=True)
    # No prefetch thread here: a source that computes its batches with torch (the toy generator)
    # would start torch's worker threads beside the training GEMMs, which on 2 cores measured
    # 30% slower than generating inline. The Zarr reader prefetches on its own, in NumPy.
    # Data parallel: each rank keeps its slice before the copy, so only that slice is moved.
    batches = to_device(
        _checked(
            source.batches(cfg.batch_size, seed=cfg.data_seed, start=state.step),
            (cfg.batch_size, state.d),
            sharding,
        ),
        state.device,
    )
    # In a log file (no terminal) a bar redrawn ten times a second buries everything else. Under
    # torchrun only rank 0 draws one; it says how many SAEs this rank trains of the whole grid.
    total = len(cfg.sparsity) * len(cfg.dict_sizes)
    desc = (
        f"{len(state.keys())} SAEs"
        if len(state.keys()) == total
        else f"rank 0: {len(state.keys())} of {total} SAEs"
    )
    bar = tqdm(
        total=until,
        initial=state.step,
        disable=not progress or not distributed.is_main(),
        unit="step",
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    t_last, step_last = time.perf_counter(), state.step
    try:
        while state.step < until:
            x = next(batches)
            data_parallel = sharding is not None and sharding.data_parallel
            for g in state.groups:
                reductions = g.forward_backward(x)
                if data_parallel:  # a latent is alive if it fired on any rank's slice
                    parallel.reduce_step(reductions)
                g.finish_step(reductions, state.step + 1)
            if data_parallel:
                parallel.average_gradients(params, sharding.world_size)
            state.optimizer.step()
            for g in state.groups:
                g.post_step()
            state.step += 1
            if _resample_due(cfg, state.step):
                pool = resample_pool(source, cfg, state.step).to(state.device)
                for g in state.groups:
                    resample_dead(
                        g,
                        pool,
                        state.optimizer,
                        g.dead_mask(cfg.dead_window, state.step),
                        resample_generator(cfg.seed, state.step, g.n),
                    )
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == until:
                stats = [_take_stats(g, sharding) for g in state.groups]
                # everywhere() calls it at once, with this step's stats
                distributed.everywhere(lambda: _check_finite(state, stats))  # noqa: B023
                now = time.perf_counter()
                rate = (state.step - step_last) * cfg.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, state.step
                # the training loss per dictionary, kept with the run: whether it has stopped
                # falling is evidence analysis needs (analyze.evidence, convergence)
                add_history(
                    state,
                    {
                        (v, g.n): {"train_mse": float(st["mse"][s])}
                        for g, st in zip(state.groups, stats, strict=True)
                        for s, v in enumerate(g.values)
                    },
                )
                row = _log_row(state, stats, rate)
                bar.set_postfix(samples_s=f"{row['samples_per_s']:,.0f}")
                if on_log and distributed.is_main():
                    on_log(row)
            _run_callbacks(state, callbacks)
            if on_step:
                on_step(state)
    finally:
        if hasattr(batches, "close"):
            batches.close()
        bar.close()
    return state


def _checked(
    batches: Iterator[torch.Tensor], shape: tuple[int, int], sharding: parallel.Sharding | None
) -> Iterator[torch.Tensor]:
    """The source's batches, each checked for its shape, then cut to this rank's rows."""
    try:
        for x in batches:
            if tuple(x.shape) != shape:
                raise ValueError(
                    f"source yielded a batch of shape {tuple(x.shape)}, expected {shape}"
                )
            yield x if sharding is None else parallel.local_rows(x, sharding)
    finally:
        if hasattr(batches, "close"):
            batches.close()


# Seed offsets of the source streams that are not the training batches.
_INIT_STREAM, _RESAMPLE_STREAM = 7919, 104_729


def resample_pool(source: ActivationSource, cfg: SAETrainConfig, step: int) -> torch.Tensor:
    """``resample_pool`` batches of candidate inputs for the resampling at ``step``: a stream of
    their own (not the training batches), a fixed function of the step so resuming is exact."""
    event = step // cfg.resample_every
    it = source.batches(
        cfg.batch_size, seed=cfg.data_seed + _RESAMPLE_STREAM, start=event * cfg.resample_pool
    )
    try:
        return torch.cat([next(it) for _ in range(cfg.resample_pool)])
    finally:
        if hasattr(it, "close"):
            it.close()


def _resample_due(cfg: SAETrainConfig, step: int) -> bool:
    return (
        cfg.resample_every > 0
        and step % cfg.resample_every == 0
        and step <= cfg.resample_until * cfg.steps
    )


def _take_stats(g: StackedGroup, sharding: parallel.Sharding | None) -> dict[str, torch.Tensor]:
    """Means since the last call, per SAE of ``g``: mse (per coordinate), l1 (sum of codes per
    row), l0; over the whole batch when it is split over ranks."""
    stats, rows = g.stats, g.stat_rows
    if sharding is not None and sharding.data_parallel:
        stats = parallel.sum_over_ranks(stats)
        rows *= sharding.world_size
    rows = max(rows, 1)
    out = {"mse": stats[0] / (rows * g.d), "l1": stats[1] / rows, "l0": stats[2] / rows}
    g.reset_stats()
    return out


def _log_row(state: GridState, stats: list[dict[str, torch.Tensor]], rate: float) -> dict:
    """The scalars of every SAE of the whole grid (gathered from the ranks in grid order); the
    rate is the slowest rank's, i.e. the whole job's."""
    per_group = []
    for gid, g, st in zip(state.group_ids, state.groups, stats):
        dead = g.dead_mask(state.config.dead_window, state.step).sum(dim=1).tolist()
        values = {k: v.tolist() for k, v in st.items()}
        items = {}
        knob = get_family(g.arch).knob.name
        for s, v in enumerate(g.values):
            tag = f"{knob}={v:g}/n={g.n}"
            items.update(
                {
                    f"{tag}/mse": values["mse"][s],
                    f"{tag}/l1": values["l1"][s],
                    f"{tag}/l0": values["l0"][s],
                    f"{tag}/dead": int(dead[s]),
                }
            )
        per_group.append((gid, items))
    if state.sharding is not None and not state.sharding.single and state.sharding.mode == "grid":
        gathered = distributed.all_gather_objects((rate, per_group))
        rate = min(r for r, _ in gathered)
        per_group = sorted((p for _, ps in gathered for p in ps), key=lambda p: p[0])
    row = {"step": state.step, "samples_per_s": rate}
    for _, items in per_group:
        row.update(items)
    return row


def _run_callbacks(state: GridState, callbacks: list[Callback], force: bool = False) -> None:
    due = [
        cb
        for cb in callbacks
        if force or state.step % cb.every == 0 or state.step == state.config.steps
    ]
    if not due:
        return
    dicts = state.dictionaries()
    merged: dict[tuple[float, int], dict[str, float]] = {}
    for cb in due:
        for key, values in cb.fn(state.step, dicts).items():
            merged.setdefault(key, {}).update(values)
    add_history(state, merged)


def add_history(state: GridState, values: dict[tuple[float, int], dict]) -> None:
    """One history record per (step, knob value, size): values logged at a step that already
    has the cell's record join it, so a grid split over ranks and one process write the same
    history (records ordered by step, then size, then the knob values' order in the config)."""
    this_step = {}
    for rec in reversed(state.history):
        if rec["step"] != state.step:
            break
        this_step[(rec["sparsity"], rec["dict_size"])] = rec
    knob = state.family.knob.name
    for (v, n), vals in values.items():
        if (v, n) in this_step:
            this_step[(v, n)].update(vals)
        else:
            state.history.append(
                {"step": state.step, knob: v, "sparsity": v, "dict_size": n, **vals}
            )


# Windows (in batches) at which the final metrics also count dead latents: dead_w<W> columns.
DEAD_WINDOWS = (25, 50, 100, 200, 400, 1000, 2000, 5000, 10_000)


def dead_windows(steps_done: int) -> list[int]:
    """The ladder's windows a run of ``steps_done`` steps can tell apart (a window longer than
    the run would only repeat the count at the run's length)."""
    return [w for w in DEAD_WINDOWS if w <= steps_done]


def dead_column(window: int) -> str:
    return f"dead_w{window}"


@torch.no_grad()
def evaluate(state, source: ActivationSource) -> dict[tuple[float, int], dict[str, float]]:
    """Metrics of every dictionary of a trained grid (or a fitted one: ``fitted.FittedGrid``)
    on the source's held-out rows (never in a training batch): ``heldout.score``'s columns, the
    one definition trained and fitted dictionaries share.

    A trained grid adds what training leaves: dead (latents silent in the last ``dead_window``
    training batches), and dead_w<W>, the same count at each window W of ``DEAD_WINDOWS`` the
    run is long enough for. A group with nested prefixes (Matryoshka) adds heldout_fvu_m<m>: the
    FVU of its first m latents alone, for each prefix size m it trained. Per latent,
    ``state.latents`` gets the held-out fire counts and the steps since each latent last fired.
    """
    cfg = state.config
    if not isinstance(state, GridState):  # fitted: its dictionaries one by one
        return evaluate_dictionaries(state.saes(), source, cfg, device=state.device)
    held = heldout_rows(source, cfg.batch_size, cfg.eval_rows, state.device)
    results = {}
    for g in state.groups:
        dn = g.dictionaries()
        prefixes = [m for m in getattr(g, "prefix_sizes", ()) if m < g.n]
        prefix_sq = torch.zeros(len(prefixes), g.S, dtype=torch.float64, device=state.device)

        def add_prefixes(x, codes, g=g, dn=dn, prefixes=prefixes, prefix_sq=prefix_sq):
            if prefixes:
                prefix_sq += prefix_squared_errors(g, x, codes, dn, prefixes)

        columns, fires = score(
            held,
            lambda x, g=g, dn=dn: g.reconstruct(x, dn),
            g.S,
            g.n,
            l1_divisor=l1_divisor(cfg.l1_norm, g.n),
            each_batch=add_prefixes,
        )
        dead = g.dead_mask(cfg.dead_window, state.step).sum(dim=1)
        # The same counter read at other windows, so the dead-neuron reading's sensitivity to the
        # window can be measured after the fact (analyze re-reads "dead" at any of these).
        ladder = {
            w: g.dead_mask(w, state.step).sum(dim=1).tolist() for w in dead_windows(state.step)
        }
        var = held.total_var
        for s, a in enumerate(g.values):
            results[(a, g.n)] = {
                **columns[s],
                "dead": int(dead[s]),
                **{dead_column(w): int(v[s]) for w, v in ladder.items()},
                **{
                    prefix_column(m): float(prefix_sq[p, s]) / var if var > 0 else math.nan
                    for p, m in enumerate(prefixes)
                },
            }
            state.latents[(a, g.n)] = {
                "heldout_fires": fires[s].cpu(),
                "since_fired": g.since_fired[s].cpu(),
            }
    return results


def prefix_column(m: int) -> str:
    return f"heldout_fvu_m{m}"


def prefix_squared_errors(g, x, codes, dn, prefixes: list[int]) -> torch.Tensor:
    """(P, S): the summed squared error of each prefix's reconstruction on its own (its first m
    latents and the decoder bias), built up chunk by chunk: one decode in all."""
    partial = -x.unsqueeze(0).expand(g.S, -1, -1)
    if g.b_dec is not None:
        partial = partial + g.b_dec.unsqueeze(1)
    out, start = [], 0
    for m in prefixes:
        partial = partial + torch.bmm(codes[:, :, start:m].transpose(0, 1), dn[:, start:m])
        out.append(partial.pow(2).sum(dim=(1, 2), dtype=torch.float64))
        start = m
    return torch.stack(out)
