"""Where this process runs: its device, and its place among torchrun's processes.

Every stage calls ``setup(device)`` once. Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in
the environment) it joins the one process group (gloo, and NCCL beside it for tensors on GPUs)
and each rank takes the GPU of its local rank; alone it is a world of one and nothing is
initialised. The rest of the code asks ``rank()``, ``world_size()``, ``is_main()`` and calls
``barrier()`` / the collectives below without caring which case it is in.
"""

from __future__ import annotations

import datetime
import os
import pickle
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unsuperpose.errors import UserError

DEVICE_HELP = (
    "cuda, cuda:N, cpu or auto (default: the GPU when one is visible, else the CPU; "
    "under torchrun each process takes the GPU of its local rank)"
)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    def describe(self) -> dict:
        """What every output records about how it was made."""
        return {
            "device": str(self.device),
            "device_name": device_name(self.device),
            "world_size": self.world_size,
        }


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier(patient: bool = False) -> None:
    """Every rank waits for all the others; ``patient``: on the long-timeout group (see setup),
    for waits on rank 0's long work alone."""
    if world_size() > 1:
        dist.barrier(group=_PATIENT[0] if patient and _PATIENT else None)


def resolve_device(
    requested: str | None = "auto", local_rank: int = 0, local_world_size: int = 1
) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is usable, else the CPU; anything else is checked.

    Under torchrun a process takes the GPU of its local rank; where a scheduler shows each
    process one GPU of its own (CUDA_VISIBLE_DEVICES), that is GPU 0. The result always has an
    index: ``torch.device("cuda") != torch.device("cuda", 0)``.
    """
    requested = (requested or "auto").strip()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r}: give cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}: this machine has no usable CUDA GPU "
                "(torch.cuda.is_available() is False); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and local_world_size > 1:
            raise UserError(
                f"--device {requested} under torchrun would put all {local_world_size} "
                "processes of this node on one GPU; give --device cuda (each takes the "
                "GPU of its local rank)"
            )
        index = dev.index if dev.index is not None else (0 if count == 1 else local_rank)
        if index >= count:
            raise UserError(
                f"--device {requested}: this process (local rank {local_rank}) needs GPU "
                f"{index}, but only {count} GPU(s) are visible; start at most {count} "
                "processes per node (--nproc_per_node), or use --device cpu"
            )
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise UserError(f"--device {requested}: only cpu and cuda are supported")
    return dev


def with_index(device: torch.device | str) -> torch.device:
    """``cuda`` as the GPU it means now (``cuda:K``), so that device comparisons hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


_PATIENT: list = []  # the gloo group for waiting on rank 0 (see setup)


def setup(device: str | None = "auto") -> Placement:
    """Join torchrun's process group when launched by it (once), and pick this rank's device.

    On GPUs the group has two backends: NCCL for tensors on the GPU, gloo for the CPU. Object
    collectives (gathering checkpoints, log records, plans) then go through gloo in host memory,
    never through GPU memory (NCCL's object gather pads every rank's share on rank 0's GPU).
    A second gloo group with a long timeout serves the waits for rank 0's work alone (building a
    token cache, scoring and saving a grid), which may take longer than any collective should.
    """
    if not launched_by_torchrun():
        return Placement(resolve_device(device), 0, 1, 0)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=2),
        )
        _PATIENT[:] = [dist.new_group(backend="gloo", timeout=datetime.timedelta(days=2))]
    return Placement(dev, dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(ok: bool = True) -> None:
    """Leave the process group. After success, together: a rank that closes its connections
    while a peer is still reading the last message makes gloo abort that peer. After a failure,
    at once: the others may be waiting in another collective, and torchrun stops them when this
    rank exits."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not ok:  # the process leaves at once; destroying NCCL with a collective pending can block
        return
    try:
        dist.barrier(group=_PATIENT[0] if _PATIENT else None)
    finally:
        _PATIENT.clear()
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End a torchrun worker once everything is written and the process group is gone, without
    the interpreter's finalisation: there, gloo's worker threads still release tensors and now
    and then abort the process ("terminate called without an active exception", about 1 run in
    30 here, pytorch/pytorch#179291), which torchrun reports as a failed job. Alone: returns."""
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a world of one returns it as it is)."""
    if world_size() == 1:
        return obj
    box = [obj]
    # Patient: the others may be waiting for rank 0's long work alone.
    dist.broadcast_object_list(box, src=src, group=_PATIENT[0] if _PATIENT else None)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj):
    """Every rank's ``obj`` on rank 0 (a list in rank order); None elsewhere."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    if world_size() == 1:
        return flag
    return any(all_gather_objects(bool(flag)))


def everywhere(fn) -> None:
    """``fn()`` on every rank; when it raises on any rank, it raises on all of them (the first
    failing rank's error), so no rank waits forever at the next collective for one that has
    stopped. Alone: ``fn()`` as it is."""
    if world_size() == 1:
        fn()
        return
    error = None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (raised on every rank just below)
        error = exc
    errors = all_gather_objects(None if error is None else (type(error), str(error)))
    if error is not None:
        raise error
    for r, e in enumerate(errors):
        if e is not None:
            kind, message = e
            try:
                failure = kind(f"{message} (on rank {r})")
            except Exception:  # noqa: BLE001 (a type that wants other arguments)
                failure = RuntimeError(f"{kind.__name__}: {message} (on rank {r})")
            raise failure


def check_same_everywhere(what: str, value) -> None:
    """Fail on every rank, naming the ranks, when ranks were started with different ``value``
    (different flags or data would silently make their shares of the work disagree)."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        shown = "; ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise UserError(
            f"the torchrun processes disagree on {what} ({shown}); start every "
            "process with the same command"
        )


@dataclass(frozen=True)
class _Failed:
    # Bad input, said to the user as it is: a UserError, or a stage's ValueError (such as
    # harvest.StoreError), raised again as that type so the others report it the same way.
    refused: type[Exception] | None
    message: str


def _refusal(exc: BaseException) -> type[Exception] | None:
    """The type rank 0's failure is raised again as on the other ranks (None: a RuntimeError)."""
    if isinstance(exc, UserError):
        return UserError  # its subclasses (locking.Locked) take other arguments
    kind = type(exc)
    if not isinstance(exc, ValueError) or not kind.__module__.startswith("unsuperpose."):
        return None  # only a stage's own errors are refusals; anything else is a failure
    try:
        kind(str(exc))
        pickle.dumps(kind)
    except Exception:  # noqa: BLE001 (a type that wants other arguments, or cannot travel)
        return None
    return kind


def from_main(fn):
    """``fn()`` run on rank 0 alone (e.g. creating shared files); every rank gets its result,
    which must pickle. A failure on rank 0 is raised on every rank, with rank 0's message,
    instead of leaving the others waiting for a result that never comes."""
    if world_size() == 1:
        return fn()
    if is_main():
        try:
            out = fn()
        except BaseException as exc:
            broadcast_object(_Failed(_refusal(exc), str(exc)))
            raise
        return broadcast_object(out)
    got = broadcast_object(None)
    if isinstance(got, _Failed):
        if got.refused is not None:
            raise got.refused(got.message)
        raise RuntimeError(f"rank 0 failed: {got.message}")
    return got


def main_first(fn):
    """``fn()`` on rank 0, then on the other ranks: e.g. rank 0 builds a cache, the others only
    read it (a failure on rank 0 stops them all, as in ``from_main``)."""
    if world_size() == 1:
        return fn()
    mine: list = []
    from_main(lambda: mine.append(fn()))
    return mine[0] if is_main() else fn()
