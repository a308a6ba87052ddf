"""Checkpoints that resume exactly, and stopping cleanly on Ctrl-C / SIGTERM.

A checkpoint is a folder: ``state.safetensors`` (every group's parameters and dead-latent
counters, Adam's moments and step counts) and ``state.json`` (step, width, the training config,
Adam's hyperparameters, the history so far). No pickles. All other randomness in training is a
function of (seed, step) — the source's batch stream and the resampling draws — so these two
files are the whole state. A new checkpoint is written beside the old one and swapped in by
renames, so a crash while saving leaves the previous one intact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unsuperpose.config import from_dict, to_dict, write_json_atomic
from unsuperpose.train.config import SAETrainConfig
from unsuperpose.train.trainer import check_finite_parameters

CHECKPOINT_DIR = "checkpoint"
# Settings a resumed run may change: how it logs and how much held-out data it is scored on.
# Not the budget (steps): the resampling schedule follows it, and a run asked for 5,000 steps
# is not the run that was planned for 10,000.
MAY_CHANGE = {"log_every", "eval_rows"}


class CheckpointMismatch(ValueError):
    """The checkpoint on disk was made by a different run than the one asked for."""


def save_checkpoint(state, directory: str | Path) -> Path:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, g in enumerate(state.groups):
        for name, t in g.state_dict().items():
            tensors[f"group{i}.{name}"] = t.contiguous()
    opt = state.optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, v in st.items():
            tensors[f"adam.{pid}.{name}"] = torch.as_tensor(v).reshape(1).clone() if name == "step" \
                else v.contiguous()
    save_file(tensors, str(tmp / "state.safetensors"))
    write_json_atomic(tmp / "state.json", {
        "step": state.step, "d": state.d, "sizes": [g.n for g in state.groups],
        "config": to_dict(state.config), "param_groups": opt["param_groups"],
        "source_fingerprint": state.source_fingerprint, "history": state.history})
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    # A kill here leaves only .old and a complete .tmp: recover_checkpoint takes the .tmp.
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def recover_checkpoint(directory: str | Path) -> None:
    """Finish a swap a kill interrupted: with ``directory`` gone, a ``.tmp`` holding its
    state.json (written last, so the folder is whole) is the newest checkpoint, else ``.old``
    is the previous one. A ``.tmp`` without state.json is half written and ignored."""
    directory = Path(directory)
    if directory.exists():
        return
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if (tmp / "state.json").exists():
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    elif (old / "state.json").exists():
        old.rename(directory)


def read_checkpoint_meta(directory: str | Path) -> dict | None:
    recover_checkpoint(directory)
    path = Path(directory) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def config_differences(saved: SAETrainConfig, config: SAETrainConfig,
                       may_change: set[str] | tuple = ()) -> list[str]:
    """One phrase per setting that differs, e.g. 'steps: 5000 then, 10000 now'."""
    return [f"{f.name}: {getattr(saved, f.name)} then, {getattr(config, f.name)} now"
            for f in dataclasses.fields(SAETrainConfig)
            if f.name not in may_change and getattr(saved, f.name) != getattr(config, f.name)]


def check_compatible(meta: dict, config: SAETrainConfig, d: int, source_info: dict | None = None) -> None:
    """Raise CheckpointMismatch naming every difference that would make resuming wrong: the
    settings (the budget included), the activation width and the data's fingerprint."""
    problems = []
    if meta["d"] != d:
        problems.append(f"activation width {meta['d']} in the checkpoint, {d} in the data now")
    try:
        saved = from_dict(SAETrainConfig, meta["config"])
    except (ValueError, TypeError) as exc:   # written by another version of unsuperpose
        raise CheckpointMismatch(f"the checkpoint's settings cannot be read ({exc}); it was written "
                                 "by another version") from None
    problems += config_differences(saved, config, MAY_CHANGE)
    want = (source_info or {}).get("fingerprint")
    have = meta.get("source_fingerprint")
    if want is not None and have != want:
        problems.append(f"data: the checkpoint was trained on data with fingerprint "
                        f"{str(have)[:12]}…, the source now has {want[:12]}…")
    if problems:
        raise CheckpointMismatch("; ".join(problems))


def load_checkpoint(state, directory: str | Path, source_info: dict | None = None) -> None:
    """Restore ``state`` (fresh from ``new_state`` with the same config) from ``directory``."""
    meta = read_checkpoint_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    check_compatible(meta, state.config, state.d, source_info)
    tensors = load_file(str(Path(directory) / "state.safetensors"))
    for i, g in enumerate(state.groups):
        prefix = f"group{i}."
        g.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("adam."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v.reshape(()) if name == "step" else v
    param_groups = meta["param_groups"]
    for pg in param_groups:
        pg["betas"] = tuple(pg["betas"])
    state.optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    state.step = int(meta["step"])
    state.history = list(meta["history"])


class Checkpointer:
    """Saves every ``every`` steps and, after Ctrl-C or SIGTERM, at the end of the current step.

    Use as a context manager around training and pass it as ``on_step``: the signal only sets a
    flag, so the step in flight finishes, the state is saved whole, then KeyboardInterrupt is
    raised for the caller to report.
    """

    def __init__(self, directory: str | Path, every: int):
        self.directory = Path(directory)
        self.every = every
        self.stop_requested = False
        self._previous: dict = {}

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.stop_requested = True

    def __enter__(self) -> "Checkpointer":
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
        if self.stop_requested or (self.every and state.step % self.every == 0):
            # The loss is checked only at log steps; a checkpoint must never keep a NaN as the
            # "last good" state, whatever the two intervals are.
            check_finite_parameters(state)
            save_checkpoint(state, self.directory)
        if self.stop_requested:
            raise KeyboardInterrupt(f"stopped at step {state.step}; checkpoint saved in {self.directory}")
