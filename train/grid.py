"""Run a grid of dictionaries into a run folder: train (or fit), evaluate, save; resume.

``run_grid`` is what ``unsuperpose toy`` and ``unsuperpose train`` run once their flags are
parsed: the run folder's identity checks (its settings, data and budget), the checkpoints, the
mirror of a folder on object storage, the tracker, and the summary, dictionaries and figures.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from unsuperpose import distributed, storage
from unsuperpose.config import to_dict
from unsuperpose.run_folder import RunMirror, check_run_folder
from unsuperpose.tracking import Tracker
from unsuperpose.train import layout, parallel
from unsuperpose.train.checkpoint import (
    CheckpointDamaged,
    Checkpointer,
    CheckpointMismatch,
    check_compatible,
    config_differences,
    load_checkpoint,
    peek_checkpoint,
    read_checkpoint_meta,
    recover_checkpoint,
    whole_state,
)
from unsuperpose.train.config import JumpReLUOptions, SAETrainConfig
from unsuperpose.train.fitted import fit_grid
from unsuperpose.train.io import (
    SOURCE_FILE,
    read_source_file,
    read_summary,
    read_train_config,
    save_grid,
    source_differences,
    write_source_file,
)
from unsuperpose.train.layout import CHECKPOINT_DIR
from unsuperpose.train.registry import get_family
from unsuperpose.train.trainer import Callback, NonFiniteLoss, evaluate, new_state, train_steps

# What `toy` and `train` use for JumpReLU unless told otherwise. The paper's bandwidth and initial
# threshold (1e-3, for activations scaled to unit mean squared norm) leave JumpReLU inert in a
# 3,000-step toy run: only pre-activations within 5e-4 of a threshold move it, so it stays near
# 1e-3 and L0 stays ~54 of 64 latents at every L0 coefficient from 0 to 0.03 (h 32, G 64, k 3).
# With 0.05 the knob works: L0 32, 22, 4.9, 2.3 at coefficients 0, 1e-3, 1e-2, 3e-2
# (train/families/jumprelu.py). Not calibrated on LM activations.
JUMPRELU_OPTIONS = JumpReLUOptions(bandwidth=0.05, init_threshold=0.05)


class GridError(ValueError):
    """A run folder that cannot be used as asked: it holds a run made otherwise, its checkpoint
    is damaged, or the training diverged. The message says what to do (in the command's flags:
    ``--force`` is ``force=True``, ``--out`` the run folder)."""


def convert_l1(values: list[float], *, have: str, want: str, base: int) -> list[float]:
    """The same penalty for a dictionary of ``base`` latents in the other L1 convention.

    per_latent divides the summed penalty by the dictionary size, so alpha_per_latent =
    alpha_sum x size; the two agree exactly at size ``base`` (1x) only, which is where the
    default grids are centred.
    """
    if have == want:
        return list(values)
    factor = base if (have, want) == ("sum", "per_latent") else 1 / base
    return [float(f"{a * factor:.6g}") for a in values]


def _finished_differences(out: Path, cfg: SAETrainConfig, source_info: dict) -> list[str]:
    """What differs between the finished grid in ``out`` and the one asked for (empty: same)."""
    try:
        saved, _ = read_train_config(out)
    except (ValueError, TypeError) as exc:  # written by an older version: not comparable
        return [f"its train_config.json cannot be read ({exc})"]
    problems = config_differences(saved, cfg, may_change=())
    have = read_source_file(out)
    if have is None:
        problems.append(f"it does not record its data ({SOURCE_FILE} is missing)")
    else:
        problems += source_differences(have, source_info)
    return problems


def _prepare(
    out: Path,
    cfg: SAETrainConfig,
    source,
    source_info: dict,
    force: bool,
    placement: distributed.Placement,
    sharding: parallel.Sharding,
    shown=None,
):
    """A fresh or resumed state, or the rows of a finished identical run (then nothing to do).

    A run is identified by its settings, its data (the source's fingerprint) and its budget:
    a checkpoint or a finished grid made otherwise is never resumed or passed off as this run.
    Rank 0 alone changes files here; the other ranks read them after it. ``shown``: what the
    messages call ``out`` (the URL of a run worked on in a local mirror).
    """
    shown = out if shown is None else shown
    ckpt = out / CHECKPOINT_DIR
    if distributed.is_main():
        if force:
            shutil.rmtree(ckpt, ignore_errors=True)
        recover_checkpoint(ckpt)
    distributed.barrier()
    meta = read_checkpoint_meta(ckpt)
    finished = layout.is_finished(out)
    # Across nodes every rank must see rank 0's --out (it resumes from the checkpoint there).
    distributed.check_same_everywhere(
        f"what {shown} holds (every node must see the same output folder)",
        (None if meta is None else meta["step"], finished),
    )
    if force:
        meta = None
    elif meta is not None:
        try:
            check_compatible(meta, cfg, int(source.d), source_info)
        except CheckpointMismatch as exc:
            raise GridError(
                f"{shown} holds an unfinished run made otherwise ({exc}); rerun with "
                "its settings and data to resume it, choose another output folder, or "
                "start over with force=True"
            ) from None
    elif finished:
        problems = _finished_differences(out, cfg, source_info)
        if not problems:
            print(
                f"{shown} already holds this grid (same settings, data and budget), finished; "
                "force=True (--force) trains it again"
            )
            return None, read_summary(out / layout.SUMMARY_FILE)
        raise GridError(
            f"{shown} holds a finished grid made otherwise: {'; '.join(problems)}. "
            "Choose another output folder, or replace it with force=True"
        )
    state = new_state(source, cfg, device=placement.device, sharding=sharding)
    if meta is not None:
        try:
            load_checkpoint(state, ckpt, source_info)
        except CheckpointDamaged as exc:
            raise GridError(
                f"{exc}: it is not whole, so it is not resumed from; start over with "
                "force=True, or restore it from a copy"
            ) from None
        print(f"resuming from the checkpoint at step {state.step:,} of {cfg.steps:,}")
    elif distributed.is_main():
        write_source_file(out, source_info)
    return state, None


def _describe_split(
    sharding: parallel.Sharding, cfg: SAETrainConfig, placement: distributed.Placement
) -> None:
    if sharding.single:
        print(f"training on {placement.device} ({distributed.device_name(placement.device)})")
        return
    if sharding.data_parallel:
        print(
            f"{sharding.world_size} processes, data parallel: each takes "
            f"{cfg.batch_size // sharding.world_size} of every batch of {cfg.batch_size}"
        )
        return
    sizes = sorted(cfg.dict_sizes)
    owner = parallel.assign_sizes(sizes, sharding.world_size)
    for r in range(sharding.world_size):
        mine = [sizes[i] for i in range(len(sizes)) if owner[i] == r]
        print(f"rank {r}: dictionary sizes {mine} ({len(mine) * len(cfg.sparsity)} SAEs)")


def grid_kept(out) -> str:
    """What a grid's run folder ``out`` keeps across an I/O fault, for the one-line error
    (reads only: the fault may still be there)."""
    if storage.is_remote(out):
        return (
            f"the last checkpoint copied up to {out / CHECKPOINT_DIR} whole (its state.json is "
            "copied last and deleted first); the rerun resumes from it, or starts over where "
            "state.json is missing"
        )
    found = peek_checkpoint(Path(out) / CHECKPOINT_DIR)
    if found is not None:
        _, meta = found
        steps = meta.get("config", {}).get("steps")
        of = f" of {steps:,}" if isinstance(steps, int) else ""
        return (
            f"the checkpoint at step {meta['step']:,}{of} in {Path(out) / CHECKPOINT_DIR}; "
            "the rerun resumes there"
        )
    if layout.is_finished(out):
        return f"the finished grid in {out}"
    return f"no checkpoint had been saved in {out} yet, so the rerun starts the grid over"


@dataclass(frozen=True)
class _Scoring:
    """How a finished grid is scored, named and saved (``run_grid``'s arguments of that kind,
    with their defaults filled in), the same for a trained grid and a fitted one."""

    size_labels: dict[int, str]
    size_base: int
    size_axis: str
    ground_truth: object
    source_info: dict
    analysis: tuple  # (score, figures): run_grid's analysis callables, or None
    more_scores: object


def run_grid(
    source,
    cfg: SAETrainConfig,
    out,
    *,
    size_labels: dict[int, str] | None = None,
    size_base: int | None = None,
    size_axis: str = "dictionary size (latents)",
    ground_truth=None,
    callbacks: list[Callback] = (),
    wandb_mode: str | None = None,
    progress: bool = True,
    run_name: str | None = None,
    source_info: dict | None = None,
    checkpoint_every: int = 1000,
    force: bool = False,
    export=None,
    score=None,
    figures=None,
    more_scores=None,
    placement: distributed.Placement | None = None,
    parallel_mode: str = "grid",
) -> list[dict]:
    """Train (or fit) the grid ``cfg`` describes on ``source`` into the run folder ``out``,
    evaluate it, and save its dictionaries, summary and figures; returns the summary's rows.

    What ``unsuperpose toy`` and ``unsuperpose train`` run, callable from Python::

        cfg = SAETrainConfig(arch="topk", sparsity=[8, 16], dict_sizes=[256, 512], steps=2000)
        rows = run_grid(ActivationStore("runs/acts/tiny/layer1.zarr"), cfg, "runs/sae/mine",
                        score=analyze.score_grid, figures=analyze.grid_figures)

    ``out`` is a folder or an object-store URL (worked on in a ``RunMirror``). A run is
    identified by its settings, its data (``source_info``, default ``source.describe()``) and its
    budget: an unfinished run made so resumes from its checkpoint, a finished one is returned as
    it is, one made otherwise is refused (``GridError``) unless ``force`` starts over.

    ``size_labels`` name the sizes in figures and rows (default: the sizes), ``size_base`` is
    what ``dict_ratio`` divides by (default the source's width), ``size_axis`` the figures' axis.
    ``ground_truth``: the true features (toy data), scored against by ``score``. The analysis is
    the caller's, since ``train`` imports no ``analyze``: ``score(dictionaries, metrics,
    ground_truth)`` adds columns per dictionary (``analyze.score_grid``) and ``figures(rows,
    history, folder, size_axis=, size_labels=)`` draws them (``analyze.grid_figures``);
    ``more_scores(state)`` adds more columns per key (e.g. the spliced-in evaluation) and
    ``export(state, folder)`` writes more formats. ``callbacks`` run during training,
    ``wandb_mode`` chooses the tracking (None: ``$WANDB_MODE``, else offline).

    Under torchrun every rank calls this; ``placement`` (``distributed.setup``) says where this
    rank runs and ``parallel_mode`` how the grid is shared ("grid" or "data"). Rank 0 alone
    writes files, logs and tracks; the rows are returned on every rank.
    """
    if isinstance(out, str):
        out = storage.location(out)
    kw = dict(
        scoring=_Scoring(
            size_labels=size_labels or {n: str(n) for n in cfg.dict_sizes},
            size_base=int(source.d) if size_base is None else size_base,
            size_axis=size_axis,
            ground_truth=ground_truth,
            source_info=source.describe() if source_info is None else source_info,
            analysis=(score, figures),
            more_scores=more_scores,
        ),
        callbacks=callbacks,
        wandb_mode=wandb_mode,
        progress=progress,
        run_name=run_name or out.name,
        checkpoint_every=checkpoint_every,
        force=force,
        export=export,
        placement=placement,
        parallel_mode=parallel_mode,
    )
    if not storage.is_remote(out):
        return _run_grid(source, cfg, out, **kw)
    check_run_folder(out)
    mirror = run_mirror(out)
    mirror.pull(force=force)
    rows = _run_grid(source, cfg, mirror.folder, mirror=mirror, **kw)
    # Everything is on the URL now; the next run downloads it again, so the copy can go.
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(mirror.folder, ignore_errors=True)
        mirror.manifest.unlink(missing_ok=True)
    return rows


def run_mirror(url) -> RunMirror:
    """The local mirror of a grid's run folder on object storage (``run_grid`` makes its own)."""
    return RunMirror(
        url, checkpoint_dir=CHECKPOINT_DIR, run_files=(layout.SUMMARY_FILE, layout.CONFIG_FILE)
    )


def _run_grid(
    source,
    cfg: SAETrainConfig,
    out: Path,
    *,
    scoring: _Scoring,
    callbacks: list[Callback] = (),
    wandb_mode: str | None = None,
    progress: bool = True,
    run_name: str,
    checkpoint_every: int = 1000,
    force: bool = False,
    export=None,
    placement: distributed.Placement | None = None,
    parallel_mode: str = "grid",
    mirror: RunMirror | None = None,
) -> list[dict]:
    """``run_grid`` into the local folder ``out`` (a URL's mirror when ``mirror`` is given)."""
    placement = placement or distributed.setup("cpu")
    if get_family(cfg.arch).fitted:
        return _fit_and_save(
            source,
            cfg,
            out,
            scoring=scoring,
            wandb_mode=wandb_mode,
            progress=progress,
            run_name=run_name,
            force=force,
            placement=placement,
            mirror=mirror,
        )
    sharding = parallel.plan(sorted(cfg.dict_sizes), parallel_mode)
    parallel.check_batch(sharding, cfg.batch_size)
    distributed.check_same_everywhere("the settings", to_dict(cfg))
    if placement.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    run_info = {**placement.describe(), **sharding.describe()}
    out.mkdir(parents=True, exist_ok=True)
    shown = out if mirror is None else mirror.url  # what messages call the run folder
    source_info = scoring.source_info
    state, done = _prepare(out, cfg, source, source_info, force, placement, sharding, shown=shown)
    if done is not None:
        return done
    _describe_split(sharding, cfg, placement)
    if not sharding.single:
        # What each process really holds (read from its state, not from the plan), so the
        # split is visible in the outputs: every rank redoing the whole grid would show here.
        run_info["sizes_by_rank"] = distributed.all_gather_objects([g.n for g in state.groups])
    main = distributed.is_main()
    run_id_file = out / layout.RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.exists() and state.step > 0 else None
    with Tracker(
        out,
        name=run_name,
        config={"train": to_dict(cfg), "source": source_info, **run_info},
        mode=wandb_mode if main else "disabled",
        resume_id=run_id,
    ) as tracker:
        if tracker.run_id and main:
            storage.write_text(run_id_file, tracker.run_id)
        try:
            copy_up = mirror.upload_checkpoint if mirror is not None and main else None
            with Checkpointer(
                out / CHECKPOINT_DIR, checkpoint_every, on_saved=copy_up
            ) as checkpointer:
                train_steps(
                    state,
                    source,
                    callbacks=callbacks,
                    progress=progress,
                    on_step=checkpointer,
                    on_log=lambda row: tracker.log(row, step=row["step"]),
                )
        except NonFiniteLoss as exc:
            kept = read_checkpoint_meta(out / CHECKPOINT_DIR)
            where = (
                f"the last good checkpoint (step {kept['step']:,}) "
                f"is kept in {shown / CHECKPOINT_DIR}"
                if kept
                else "no checkpoint had been written yet"
            )
            raise GridError(f"{exc}; {where}") from None
        state = whole_state(state, source)
        if state is None:  # another rank's share, now with rank 0
            return distributed.broadcast_object(None)
        rows = _score_and_save(
            state,
            evaluate(state, source),
            out,
            tracker,
            scoring,
            run_info,
            export=export,
            history=state.history,
        )
        tracker.summary({"steps": state.step})
    # The dictionaries and summary are written; the checkpoint's weights and Adam state would only
    # take disk space (3x the dictionaries).
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    if mirror is not None:
        mirror.push()
    return distributed.broadcast_object(rows)


def _score_and_save(
    state,
    metrics: dict,
    out: Path,
    tracker: Tracker,
    scoring: _Scoring,
    run_info: dict,
    *,
    info: dict | None = None,
    export=None,
    history=(),
) -> list[dict]:
    """Rank 0, once a grid is trained or fitted and evaluated: score every dictionary (against
    the ground truth when there is one), add ``info`` and ``more_scores(state)``'s columns per
    key, write the dictionaries, summary and figures (``export`` may add formats), and hand the
    summary and figures to the tracker. Returns the summary's rows."""
    score, draw = scoring.analysis
    dictionaries = state.dictionaries()
    if score is None:
        scores = {key: {} for key in dictionaries}
    else:
        scores = score(dictionaries, metrics, scoring.ground_truth)
    for key, s in scores.items():
        s.update((info or {}).get(key, {}), dict_ratio=key[1] / scoring.size_base)
    if scoring.more_scores is not None:
        for key, extra in scoring.more_scores(state).items():
            scores[key].update(extra)
    rows = save_grid(
        state,
        metrics,
        out,
        extra=scores,
        labels=scoring.size_labels,
        source_info=scoring.source_info,
        run_info=run_info,
    )
    if export is not None:
        export(state, out)
    figures = {}
    if draw is not None:
        figures = draw(
            rows,
            list(history),
            out / layout.FIGURES_DIR,
            size_axis=scoring.size_axis,
            size_labels=scoring.size_labels,
        )
    columns = list(rows[0])
    tracker.log_table("summary", columns, [[r.get(c) for c in columns] for r in rows])
    tracker.log_images({f"figures/{k}": v for k, v in figures.items()})
    return rows


def _fit_and_save(
    source,
    cfg: SAETrainConfig,
    out: Path,
    *,
    scoring: _Scoring,
    wandb_mode: str | None,
    progress: bool,
    run_name: str,
    force: bool,
    placement: distributed.Placement,
    mirror: RunMirror | None,
) -> list[dict]:
    """``_run_grid`` for a fitted baseline (``train.fitted``): no steps, no checkpoint.

    The same identity rules: a finished folder with these settings, data and budget is returned
    as it is, one made otherwise is refused (or replaced with ``force``). Rank 0 fits and
    writes; the other ranks get its rows.
    """
    shown = out if mirror is None else mirror.url
    source_info = scoring.source_info
    family = get_family(cfg.arch)
    if family.check_sizes is not None:  # before anything is written
        try:
            family.check_sizes(int(source.d), sorted(cfg.dict_sizes))
        except ValueError as exc:
            raise GridError(f"{exc}: choose smaller dictionary sizes for {cfg.arch}") from None
    out.mkdir(parents=True, exist_ok=True)
    if layout.is_finished(out) and not force:
        problems = _finished_differences(out, cfg, source_info)
        if not problems:
            print(
                f"{shown} already holds this fit (same settings, data and budget); "
                "force=True (--force) fits it again"
            )
            return read_summary(out / layout.SUMMARY_FILE)
        raise GridError(
            f"{shown} holds a finished grid made otherwise: {'; '.join(problems)}. "
            "Choose another output folder, or replace it with force=True"
        )
    if not distributed.is_main():
        return distributed.broadcast_object(None)
    if distributed.world_size() > 1:
        print(f"{cfg.arch} is fitted, not trained: rank 0 fits the whole grid")
    if force:
        shutil.rmtree(out / layout.SAES_DIR, ignore_errors=True)
    write_source_file(out, source_info)
    run_info = placement.describe()
    with Tracker(
        out,
        name=run_name,
        config={"train": to_dict(cfg), "source": source_info, **run_info},
        mode=wandb_mode,
    ) as tracker:
        state = fit_grid(source, cfg, device=placement.device, progress=progress)
        rows = _score_and_save(
            state, evaluate(state, source), out, tracker, scoring, run_info, info=state.info
        )
    if mirror is not None:
        mirror.push()
    return distributed.broadcast_object(rows)
