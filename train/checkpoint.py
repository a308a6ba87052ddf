"""Checkpoints that resume exactly, and stopping cleanly on Ctrl-C / SIGTERM.

A checkpoint is a folder: ``state.safetensors`` (every group's parameters and dead-latent
counters, Adam's moments and step counts) and ``state.json`` (step, width, the training config,
Adam's hyperparameters, the history so far). No pickles. All other randomness in training is a
function of (seed, step) — the source's batch stream and the resampling draws — so these two
files are the whole state. A new checkpoint is written beside the old one and swapped in by
renames, so a crash while saving leaves the previous one intact.

Tensors are named by their place in the whole grid and their own name, never counted:
``group<i>.<name>`` is tensor <name> (``W_dec``, ``since_fired``, a JumpReLU's ``log_threshold``)
of the i-th size in sorted order, ``adam.group<i>.<name>.<moment>`` Adam's state for it; never
by a rank's share of the grid: under torchrun
rank 0 gathers every rank's sizes and writes exactly the files one process would, so a checkpoint
resumes under any number of processes and on any device (tensors are loaded onto the CPU and
copied into the state's own).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unsuperpose import distributed, faults
from unsuperpose.config import from_dict, to_dict, write_json_atomic
from unsuperpose.train import parallel
from unsuperpose.train.config import SAETrainConfig, irrelevant_fields
from unsuperpose.train.trainer import check_finite_parameters, new_state

# Settings a resumed run may change: how it logs and how much held-out data it is scored on.
# Not the budget (steps): the resampling schedule follows it, and a run asked for 5,000 steps
# is not the run that was planned for 10,000.
MAY_CHANGE = {"log_every", "eval_rows"}
WEIGHTS = "state.safetensors"
META = "state.json"  # written last: a folder without it is half written
STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (torchrun only)


class CheckpointMismatch(ValueError):
    """The checkpoint on disk was made by a different run than the one asked for."""


class CheckpointDamaged(ValueError):
    """The checkpoint on disk is not whole (its weights file is not the length it recorded)."""


def _param_names(state) -> list[str]:
    """The whole-grid name of each parameter of this state's optimizer, in its order."""
    return [
        f"group{gid}.{name}"
        for gid, g in zip(state.group_ids, state.groups)
        for name in g.named_parameters()
    ]


def local_tensors(state) -> dict[str, torch.Tensor]:
    """This state's share of a checkpoint, on the CPU, under whole-grid names."""
    tensors: dict[str, torch.Tensor] = {}
    for gid, g in zip(state.group_ids, state.groups):
        for name, t in g.state_dict().items():
            tensors[f"group{gid}.{name}"] = t.contiguous().cpu()
        tensors.update(_stat_tensors(gid, g.stats, g.stat_rows))
    names = _param_names(state)
    for pid, st in state.optimizer.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"adam.{names[pid]}.{name}"] = (
                torch.as_tensor(v).reshape(1).cpu().clone()
                if name == "step"
                else v.contiguous().cpu()
            )
    return tensors


def _stat_tensors(gid: int, sums: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """The training scalars summed since the last log: the next logged mean must be the one an
    uninterrupted run logs, wherever the checkpoint falls between two logs."""
    return {
        f"stats.group{gid}.sums": sums.detach().contiguous().cpu().clone(),
        f"stats.group{gid}.rows": torch.tensor([int(rows)], dtype=torch.int64),
    }


def _history_order(state):
    sizes = sorted(state.config.dict_sizes)
    values = state.config.sparsity
    return lambda rec: (
        rec["step"],
        sizes.index(rec["dict_size"]),
        values.index(rec["sparsity"]),
    )


def gather_whole(state) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
    """(tensors, history) of the whole grid on rank 0, in one process's order; None elsewhere."""
    sh = state.sharding
    if sh is None or sh.single or sh.data_parallel:  # this rank holds the whole grid
        return (local_tensors(state), list(state.history)) if distributed.is_main() else None
    parts = distributed.gather_to_main((local_tensors(state), state.history))
    if parts is None:
        return None
    tensors = {k: v for t, _ in parts for k, v in t.items()}
    history = sorted((rec for _, h in parts for rec in h), key=_history_order(state))
    return tensors, history


def _param_groups(state) -> list[dict]:
    """Adam's settings with the whole grid's parameter ids (what one process's state_dict has)."""
    groups = state.optimizer.state_dict()["param_groups"]
    total = len(state.config.dict_sizes) * len(state.groups[0].named_parameters())
    return [{**groups[0], "params": list(range(total))}]


def save_checkpoint(state, directory: str | Path) -> Path:
    """Every rank calls this at the same step; rank 0 writes the whole grid's checkpoint."""
    directory = Path(directory)
    sh = state.sharding
    # Data parallel, each rank sums the scalars of its slice of the batch: the checkpoint keeps
    # the whole batch's (every rank calls this at the same step, so the sum is a collective).
    summed = (
        {
            gid: (parallel.sum_over_ranks(g.stats), g.stat_rows * sh.world_size)
            for gid, g in zip(state.group_ids, state.groups)
        }
        if sh is not None and sh.data_parallel and not sh.single
        else None
    )
    whole = gather_whole(state)
    if whole is not None:
        for gid, (sums, rows) in (summed or {}).items():
            whole[0].update(_stat_tensors(gid, sums, rows))
        _write(state, whole, directory)
    distributed.barrier()
    return directory


def _write(state, whole: tuple[dict[str, torch.Tensor], list[dict]], directory: Path) -> None:
    tensors, history = whole
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with faults.writing(tmp):
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / WEIGHTS))
            write_json_atomic(
                tmp / META,
                {
                    "step": state.step,
                    "d": state.d,
                    "sizes": sorted(state.config.dict_sizes),
                    "config": to_dict(state.config),
                    "param_groups": _param_groups(state),
                    "source_fingerprint": state.source_fingerprint,
                    "history": history,
                    # A weights file of another length was cut short: never resumed from.
                    "weights_bytes": (tmp / WEIGHTS).stat().st_size,
                },
            )
    except Exception:
        # Half a checkpoint is never read (it has no state.json); on a full disk the space it
        # holds is what the user needs back.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    # A kill here leaves only .old and a complete .tmp: recover_checkpoint takes the .tmp.
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(directory: str | Path) -> None:
    """Finish a swap a kill interrupted: with ``directory`` gone, a ``.tmp`` holding its
    state.json (written last, so the folder is whole) is the newest checkpoint, else ``.old``
    is the previous one. A ``.tmp`` without state.json is half written and ignored."""
    directory = Path(directory)
    if directory.exists():
        return
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if (tmp / META).exists():
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    elif (old / META).exists():
        old.rename(directory)


def read_checkpoint_meta(directory: str | Path) -> dict | None:
    recover_checkpoint(directory)
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.exists() else None


def peek_checkpoint(directory: str | Path) -> tuple[Path, dict] | None:
    """(folder, state.json) of the checkpoint the next run would resume, changing nothing
    (``recover_checkpoint``'s choice, read only): for saying what a fault left."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    candidates = [directory] if directory.exists() else [tmp, old]
    for folder in candidates:
        if (folder / META).exists():
            return folder, json.loads((folder / META).read_text())
    return None


def check_whole(directory: str | Path, meta: dict) -> None:
    """CheckpointDamaged if the weights file is missing or not the length state.json recorded
    (checkpoints from before the length was recorded are trusted as they are)."""
    path = Path(directory) / WEIGHTS
    want = meta.get("weights_bytes")
    have = path.stat().st_size if path.exists() else None
    if have is None or (want is not None and have != want):
        found = "is missing" if have is None else f"has {have:,} bytes, not the {want:,} written"
        raise CheckpointDamaged(f"the checkpoint {directory}: {WEIGHTS} {found}")


def config_differences(
    saved: SAETrainConfig, config: SAETrainConfig, may_change: set[str] | tuple = ()
) -> list[str]:
    """One phrase per setting that differs, e.g. 'steps: 5000 then, 10000 now'; settings that
    neither run's architecture reads (another one's knob or options) are not compared."""
    ignored = set(may_change) | (irrelevant_fields(saved) & irrelevant_fields(config))
    return [
        f"{f.name}: {getattr(saved, f.name)} then, {getattr(config, f.name)} now"
        for f in dataclasses.fields(SAETrainConfig)
        if f.name not in ignored and getattr(saved, f.name) != getattr(config, f.name)
    ]


def check_compatible(
    meta: dict, config: SAETrainConfig, d: int, source_info: dict | None = None
) -> None:
    """Raise CheckpointMismatch naming every difference that would make resuming wrong: the
    settings (the budget included), the activation width and the data's fingerprint."""
    problems = []
    if meta["d"] != d:
        problems.append(f"activation width {meta['d']} in the checkpoint, {d} in the data now")
    try:
        saved = from_dict(SAETrainConfig, meta["config"])
    except (ValueError, TypeError) as exc:  # written by another version of unsuperpose
        raise CheckpointMismatch(
            f"the checkpoint's settings cannot be read ({exc}); it was written by another version"
        ) from None
    problems += config_differences(saved, config, MAY_CHANGE)
    want = (source_info or {}).get("fingerprint")
    have = meta.get("source_fingerprint")
    if want is not None and have != want:
        problems.append(
            f"data: the checkpoint was trained on data with fingerprint "
            f"{str(have)[:12]}…, the source now has {want[:12]}…"
        )
    if problems:
        raise CheckpointMismatch("; ".join(problems))


def load_checkpoint(state, directory: str | Path, source_info: dict | None = None) -> None:
    """Restore ``state`` (fresh from ``new_state`` with the same config) from ``directory``."""
    meta = read_checkpoint_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    check_compatible(meta, state.config, state.d, source_info)
    check_whole(directory, meta)
    # Each rank reads only its share (eight ranks on a node would otherwise hold eight copies).
    wanted = {f"{kind}group{gid}." for gid in state.group_ids for kind in ("", "adam.", "stats.")}
    with safe_open(str(Path(directory) / WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(tuple(wanted))}
    restore(state, tensors, int(meta["step"]), meta["history"], meta["param_groups"])


def _keeps_history_of(state, dict_size: int) -> bool:
    """Which callback records a rank carries: those of its own sizes (rank 0 alone when data
    parallel), so gathering them again later yields each record once."""
    sh = state.sharding
    if sh is None or sh.single:
        return True
    if sh.data_parallel:
        return sh.rank == 0
    return dict_size in {g.n for g in state.groups}


def restore(
    state,
    tensors: dict[str, torch.Tensor],
    step: int,
    history: list[dict],
    param_groups: list[dict] | None = None,
) -> None:
    """Put this state's share of a whole-grid checkpoint (``tensors``) into it."""
    sh = state.sharding
    # The checkpoint holds the whole batch's sums and rows. Data parallel, each rank counts the
    # rows of its slice (the logged mean multiplies them by the ranks) and rank 0 alone carries
    # the sums (the others add their slices' to them).
    split = sh is not None and sh.data_parallel and not sh.single
    for gid, g in zip(state.group_ids, state.groups):
        prefix = f"group{gid}."
        g.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        sums = tensors.get(f"stats.group{gid}.sums")
        if sums is not None:  # absent from checkpoints of older versions
            rows = int(tensors[f"stats.group{gid}.rows"].item())
            if split and sh.rank != 0:
                sums = torch.zeros_like(sums)
            g.stats = sums.to(device=g.stats.device, dtype=g.stats.dtype).clone()
            g.stat_rows = rows // sh.world_size if split else rows
    if param_groups is not None:
        local = {name: lp for lp, name in enumerate(_param_names(state))}
        opt_state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("adam."):
                param, _, moment = key[len("adam.") :].rpartition(".")
                if param in local:
                    opt_state.setdefault(local[param], {})[moment] = (
                        v.reshape(()) if moment == "step" else v
                    )
        opt_state = {k: opt_state[k] for k in sorted(opt_state)}  # in the parameters' order
        hyper = {k: v for k, v in param_groups[0].items() if k != "params"}
        hyper["betas"] = tuple(hyper["betas"])
        groups = [{**hyper, "params": list(range(len(local)))}]
        state.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    state.step = int(step)
    state.history = [rec for rec in history if _keeps_history_of(state, rec["dict_size"])]


def whole_state(state, source):
    """The whole grid as one process's state on rank 0 (for scoring and saving); None on the
    other ranks. A one-process state is returned as it is."""
    sh = state.sharding
    if sh is None or sh.single:
        return state
    if sh.data_parallel:  # every rank holds the whole grid already
        if not distributed.is_main():
            return None
        for g in state.groups:  # from here on rank 0 works alone: no more collectives
            g.data_parallel = False
        return state
    whole = gather_whole(state)
    if whole is None:
        return None
    full = new_state(source, state.config, device=state.device)
    tensors, history = whole
    restore(full, tensors, state.step, history)
    return full


class Checkpointer:
    """Saves every ``every`` steps and, after Ctrl-C or SIGTERM, at the end of the current step.

    Use as a context manager around training and pass it as ``on_step``: the signal only sets a
    flag, so the step in flight finishes, the state is saved whole, then KeyboardInterrupt is
    raised for the caller to report.
    """

    def __init__(self, directory: str | Path, every: int, on_saved=None):
        """``on_saved()`` runs after each checkpoint is written (e.g. copying it elsewhere)."""
        self.directory = Path(directory)
        self.every = every
        self.on_saved = on_saved
        self.stop_requested = False
        self._previous: dict = {}

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.stop_requested = True

    def __enter__(self) -> Checkpointer:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._request_stop)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self, state) -> None:
        stop = self.stop_requested
        if distributed.world_size() > 1:
            # torchrun signals every rank, but each notices at its own step; they agree which
            # step to stop at, so all stop at the same one.
            # torchrun sends SIGKILL 30 s after SIGTERM, so they agree every few steps, through
            # gloo on the host (no wait on the GPU).
            due = state.step % STOP_CHECK_EVERY == 0 or state.step == state.config.steps
            stop = distributed.any_rank(stop) if due else False
        if stop or (self.every and state.step % self.every == 0):
            # The loss is checked only at log steps; a checkpoint must never keep a NaN as the
            # "last good" state, whatever the two intervals are.
            distributed.everywhere(lambda: check_finite_parameters(state))
            save_checkpoint(state, self.directory)
            if self.on_saved is not None:
                self.on_saved()
        if stop:
            raise KeyboardInterrupt(
                f"stopped at step {state.step}; checkpoint saved in {self.directory}"
            )
