"""How one grid is shared among torchrun's processes, and gathered back for saving.

Two ways, chosen with ``--parallel``:

``grid`` (the default): the grid's dictionary sizes are dealt out to the ranks, whole. Every rank
reads the same seeded batch stream (nothing but small log records and, at checkpoints, the
weights cross the network) and trains its sizes exactly as one process would: a size's
``SAEGroup`` does the same arithmetic on the same shapes wherever it runs, so the results are
bit-identical to one process at the same number of threads per process. A whole size is the unit
because splitting one size's L1 values would change the shapes of its stacked GEMMs, and with
them the float rounding. Sizes go to ranks by longest-processing-time first (a size's step costs
~its latent count), so ranks finish together.

``data``: every rank holds every SAE and takes its own slice of each batch; the gradients are
averaged across ranks (what DDP does, for our hand-written backward), so all ranks take the same
Adam step. For one grid too big or too slow for one device. Equal to one process within float
tolerance (the batch mean is summed in another order).

Checkpoints and outputs do not depend on the number of ranks: rank 0 gathers every size and
writes the same files one process would, so a run resumes under any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from unsuperpose import distributed

MODES = ("grid", "data")


class ShardingError(ValueError):
    """A grid that cannot be shared among the processes as asked."""


@dataclass(frozen=True)
class Sharding:
    mode: str  # "grid" or "data"
    rank: int
    world_size: int
    owned: tuple[int, ...]  # indices (in sorted-size order) of the sizes this rank trains

    @property
    def single(self) -> bool:
        return self.world_size == 1

    @property
    def data_parallel(self) -> bool:
        return self.mode == "data" and self.world_size > 1

    def describe(self) -> dict:
        return {
            "world_size": self.world_size,
            "parallel": self.mode if self.world_size > 1 else None,
        }


def assign_sizes(sizes: list[int], world_size: int) -> list[int]:
    """The rank of each size (``sizes`` in training order): largest first onto the least loaded
    rank, ties to the lower rank, so the plan is a pure function of the sizes and world size."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def plan(
    sizes: list[int], mode: str = "grid", rank: int | None = None, world_size: int | None = None
) -> Sharding:
    """This rank's share of a grid whose sizes (sorted, as trained) are ``sizes``."""
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    if mode not in MODES:
        raise ShardingError(f"mode={mode!r}: choose grid or data")
    everything = tuple(range(len(sizes)))
    if world_size == 1 or mode == "data":
        return Sharding(mode, rank, world_size, everything)
    if world_size > len(sizes):
        raise ShardingError(
            f"mode='grid' deals whole dictionary sizes to the {world_size} "
            f"processes, but the grid has only {len(sizes)} size(s); start at most "
            f"{len(sizes)} processes, or use mode='data'"
        )
    owner = assign_sizes(sizes, world_size)
    return Sharding(mode, rank, world_size, tuple(i for i in everything if owner[i] == rank))


def check_batch(sharding: Sharding, batch_size: int) -> None:
    if sharding.data_parallel and batch_size % sharding.world_size:
        raise ShardingError(
            f"mode='data' splits each batch of {batch_size} over "
            f"{sharding.world_size} processes; choose a batch size divisible by it"
        )


def local_rows(x: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """This rank's slice of the global batch (all of it unless data parallel)."""
    if not sharding.data_parallel:
        return x
    per = len(x) // sharding.world_size
    return x[sharding.rank * per : (sharding.rank + 1) * per]


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Mean of every rank's gradients, in place, tensor by tensor: no second copy of all the
    gradients, which for the grids data parallelism is for would be the memory it saves."""
    grads = [p.grad for p in params]
    for g in grads:
        dist.all_reduce(g)
        g.div_(world_size)


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}


def reduce_step(reductions: dict[str, tuple[torch.Tensor, str]]) -> None:
    """Combine a step's per-rank tensors (firing counts, a batch minimum) in place, so every
    rank's group updates its counters and buffers from the whole batch."""
    for tensor, op in reductions.values():
        dist.all_reduce(tensor, op=_OPS[op])


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out
