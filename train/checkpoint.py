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
# Settings a resumed run may change: it may be asked to train longer or log differently.
MAY_CHANGE = {"steps", "log_every", "eval_batches", "resample_until"}


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
        "history": state.history})
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def read_checkpoint_meta(directory: str | Path) -> dict | None:
    path = Path(directory) / "state.json"
    return json.loads(path.read_text()) if path.exists() else None


def check_compatible(meta: dict, config: SAETrainConfig, d: int) -> None:
    """Raise CheckpointMismatch naming every difference that would make resuming wrong."""
    problems = []
    if meta["d"] != d:
        problems.append(f"activation width {meta['d']} in the checkpoint, {d} in the data now")
    saved = from_dict(SAETrainConfig, meta["config"])
    for f in dataclasses.fields(SAETrainConfig):
        a, b = getattr(saved, f.name), getattr(config, f.name)
        if f.name not in MAY_CHANGE and a != b:
            problems.append(f"{f.name}: {a} in the checkpoint, {b} now")
    if problems:
        raise CheckpointMismatch("; ".join(problems))


def load_checkpoint(state, directory: str | Path) -> None:
    """Restore ``state`` (fresh from ``new_state`` with the same config) from ``directory``."""
    meta = read_checkpoint_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    check_compatible(meta, state.config, state.d)
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
