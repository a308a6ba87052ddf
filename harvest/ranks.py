"""Who harvests what under torchrun, and what a store records about the ranks that made it.

The rows are cut into work units of whole chunks of every store: ranks never write the same
chunk, and every chunk is written whole, as one process writes it. In round j, rank r takes
unit j*W + r (counted from the unit where this run starts), so a resume starts the same way
whatever the number of ranks before. Only rank 0 creates stores and writes their attributes.
"""

from __future__ import annotations

import math
from typing import Any

from unsuperpose import distributed

from . import store

STRADDLE_BATCHES = 4
MAX_RUNS = 20  # harvest_runs entries kept in a store's attributes (the latest ones)


def work_unit(chunk_rows: list[int], batch_rows: int) -> int:
    """Rows per work unit: whole chunks of every store (so ranks never share a chunk), and whole
    forward batches too (so no batch is computed twice) unless that makes units over 16x larger
    than a chunk or a batch. Then a unit is the fewest whole chunks that hold STRADDLE_BATCHES
    batches: the batch straddling two ranks' units, computed by both, costs at most 1/4 more."""
    chunks = math.lcm(*chunk_rows)
    both = math.lcm(chunks, batch_rows)
    if both <= 16 * max(chunks, batch_rows):
        return both
    return chunks * -(-STRADDLE_BATCHES * batch_rows // chunks)


def n_rounds(first: int, rows: int, unit: int, world: int) -> int:
    """Rounds needed for the units from the one holding row ``first`` to the last one's."""
    return -(-(-(-rows // unit) - first // unit) // world)


def round_rows(j: int, first: int, rows: int, unit: int, world: int) -> tuple[int, int]:
    """The rows [lo, hi) that round j covers, over all ranks."""
    u0 = first // unit
    return max(first, (u0 + j * world) * unit), min(rows, (u0 + (j + 1) * world) * unit)


def rank_pieces(
    first: int, rows: int, unit: int, batch_rows: int, rank: int, world: int
) -> list[tuple[int, int, int, int]]:
    """(round, forward batch, lo, hi) for the rows [lo, hi) this rank writes, in row order.

    Units are counted from the one holding row ``first`` (a resume's first row); in round j,
    rank r takes unit j*world + r. Forward batches are the fixed slices of batch_rows rows, so a
    rank computes exactly the batches that overlap its units.
    """
    u0, pieces = first // unit, []
    for k in range(rank, -(-rows // unit) - u0, world):
        lo, hi = max(first, (u0 + k) * unit), min(rows, (u0 + k + 1) * unit)
        for b in range(lo // batch_rows, (hi - 1) // batch_rows + 1):
            pieces.append((k // world, b, max(lo, b * batch_rows), min(hi, (b + 1) * batch_rows)))
    return pieces


def shared_plan(targets: list, plan) -> dict:
    """Rank 0 runs ``plan`` (only it creates, grows or describes stores); the other ranks then
    open the same stores and get the same work. A refusal on rank 0 stops every rank."""
    if distributed.world_size() == 1:
        return plan()
    mine: dict = {}

    def on_main() -> dict:
        mine.update(plan())
        return {key: [(targets.index(t), start) for t, _, start in ws] for key, ws in mine.items()}

    got = distributed.from_main(on_main)
    if distributed.is_main():
        return mine
    return {
        key: [(targets[i], store.open_group(targets[i].path, mode="r+"), start) for i, start in ws]
        for key, ws in got.items()
    }


def record_run(group: Any, made: dict, precision: str, start: int, rows: int) -> None:
    """Top-level world_size/device/precision of the latest run, and a short list of the runs
    (a resume with another world size or device shows there)."""
    runs = list(group.attrs.get("harvest_runs") or [])[-(MAX_RUNS - 1) :]
    runs.append({**made, "precision": precision, "rows_from": int(start), "rows_to": int(rows)})
    group.update_attributes({**made, "precision": precision, "harvest_runs": runs})  # one write


def record_shares(groups: list, shares: list[dict]) -> None:
    """What each rank computed, beside the run it belongs to: the split is visible in the store."""
    for group in groups:
        runs = list(group.attrs.get("harvest_runs") or [])
        if runs:
            runs[-1] = {**runs[-1], "ranks": shares}
            group.update_attributes({"harvest_runs": runs})
    if len(shares) > 1:
        for s in shares:
            print(
                f"harvest: rank {s['rank']} ({s['device']}) ran {s['forward_batches']:,} "
                f"forward batches and wrote {s['rows']:,} rows"
            )
