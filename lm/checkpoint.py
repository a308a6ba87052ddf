"""Training checkpoints: everything a resumed run needs to continue bit for bit.

Model and optimizer state, the step reached, the RNG states (dropout draws from torch's), the
W&B run id (so the resumed run logs into the same run) and the configs that produced it. The
learning rate and the data position are functions of the step (see schedule.py), so the step
restores them. One file, replaced atomically: an interruption mid-write leaves the previous one.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from unsuperpose import faults
from unsuperpose.lm.errors import RunExists

CHECKPOINT = "checkpoint.pt"

try:  # NumPy 2 moved it; the RNG state pickles an ndarray through this function
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct

# Everything in a checkpoint is tensors and plain containers except NumPy's RNG state (a tuple
# holding an ndarray). Allowing exactly those types lets torch.load run with weights_only=True,
# so a checkpoint file can never execute code when it is loaded.
_SAFE_GLOBALS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_checkpoint(
    out_dir: Path,
    *,
    step: int,
    model,
    optimizer,
    identity: dict,
    wandb_id: str | None,
    elapsed: float,
) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "identity": identity,
        "wandb_id": wandb_id,
        "elapsed": elapsed,
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{CHECKPOINT}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, out_dir / CHECKPOINT)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        faults.mark(exc, out_dir / CHECKPOINT)  # torch.save's failed write names no file
        raise


def load_checkpoint(out_dir: Path, identity: dict) -> dict | None:
    """The checkpoint in ``out_dir``, if any; a RunExists error if it belongs to a different run."""
    path = out_dir / CHECKPOINT
    if not path.is_file():
        return None
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if state["identity"] != identity:
        now, then = _flatten(identity), _flatten(state["identity"])
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        raise RunExists(
            f"{out_dir} holds a checkpoint of a different run (differs in: {', '.join(changed)}); "
            "train with the same settings to resume it, with overwrite=True to start over, "
            "or into another folder"
        )
    return state


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def restore_rng(state: dict) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
