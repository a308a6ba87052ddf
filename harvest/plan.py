"""Plan and resume: open, create or grow each store of a harvest, check that an existing one
was made from the same source (and precision, and batch size), and say which rows each forward
pass writes. Rank 0 plans; ``ranks.shared_plan`` hands the plan to the others."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from unsuperpose import storage
from unsuperpose.config import to_dict

from . import ranks, store
from .config import HarvestConfig, HarvestError
from .hooks import Target
from .store import StoreError

CONFIG_FILE = "harvest_config.json"  # the HarvestConfig of the latest run, inside each store


def mask_fingerprint(heldout: np.ndarray | None) -> str | None:
    """sha256 of a 0/1 held-out mask, read in pieces (it may memory-map the whole corpus)."""
    if heldout is None:
        return None
    flat, h = heldout.reshape(-1), hashlib.sha256()
    for i in range(0, len(flat), 1 << 26):
        h.update((flat[i : i + (1 << 26)] != 0).view(np.uint8))
    return h.hexdigest()


def open_or_create(
    t: Target,
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
        return old_store(t, group, prov, rows)
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


def old_store(t: Target, group: Any, prov: store.Provenance, rows: int) -> tuple[Any, int, int]:
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


def print_plan(work: list[tuple[Target, Any, int]], rows: int, out_dir: Path) -> None:
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


def plan_stores(
    targets: list[Target],
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
        group, start, stored_batch = open_or_create(
            t,
            prov,
            rows,
            chunk_rows,
            cfg.batch_size,
            cfg.force,
            # called inside open_or_create, within this iteration
            keep=lambda g: kept.setdefault("precision", kept_precision(t, g, asked, precision)),  # noqa: B023
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
    print_plan([w for ws in work.values() for w in ws], rows, out_dir)
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


def kept_precision(t: Target, group: Any, asked: str, precision: str) -> str:
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
