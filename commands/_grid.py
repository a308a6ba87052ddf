"""What `unsuperpose toy` and `unsuperpose train` share: SAE flags, and training + saving a grid."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from unsuperpose import distributed, locking, storage
from unsuperpose.analyze import grid_figures, score_grid
from unsuperpose.commands._errors import stage_errors
from unsuperpose.config import add_arguments, replace_from_args, to_dict, write_text_atomic
from unsuperpose.errors import UserError
from unsuperpose.tracking import Tracker
from unsuperpose.train import (
    FAMILIES,
    PRESETS,
    Callback,
    NonFiniteLoss,
    SAETrainConfig,
    apply_preset,
    evaluate,
    get_family,
    layout,
    new_state,
    parallel,
    parse_dict_sizes,
    read_summary,
    save_grid,
    train_steps,
)
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
from unsuperpose.train.config import JumpReLUOptions
from unsuperpose.train.fitted import fit_grid
from unsuperpose.train.io import (
    SOURCE_FILE,
    read_source_file,
    read_train_config,
    source_differences,
    write_source_file,
)
from unsuperpose.train.layout import CHECKPOINT_DIR
from unsuperpose.train.registry import DEFAULT_ARCH, knobs

# Parsed from the knobs' flags (--l1, --topk, ...: the registered families') and --dict, so that
# ratios and lists get clear errors and a knob given to the wrong architecture is refused.
SKIP = ("sparsity", "dict_sizes")
# What `toy` and `train` use for JumpReLU unless told otherwise. The paper's bandwidth and initial
# threshold (1e-3, for activations scaled to unit mean squared norm) leave JumpReLU inert in a
# 3,000-step toy run: only pre-activations within 5e-4 of a threshold move it, so it stays near
# 1e-3 and L0 stays ~54 of 64 latents at every L0 coefficient from 0 to 0.03 (h 32, G 64, k 3).
# With 0.05 the knob works: L0 32, 22, 4.9, 2.3 at coefficients 0, 1e-3, 1e-2, 3e-2
# (train/families/jumprelu.py). Not calibrated on LM activations.
JUMPRELU_OPTIONS = JumpReLUOptions(bandwidth=0.05, init_threshold=0.05)


def add_sae_arguments(
    parser: argparse.ArgumentParser,
    *,
    dict_flag: str,
    dict_help: str,
    defaults: SAETrainConfig,
    knob_defaults: dict[str, list],
    skip: tuple[str, ...] = (),
) -> None:
    """The SAE flags; ``--help`` shows ``defaults`` and ``knob_defaults`` (by knob name), the
    command's own (not the dataclass's). One flag per registered knob: architectures sharing a
    knob share its flag."""
    for flag, knob in knobs().items():
        archs = [f.name for f in FAMILIES.values() if f.knob.flag == flag]
        shown = ",".join(knob.text(v) for v in knob_defaults.get(knob.name, knob.defaults))
        parser.add_argument(
            flag,
            dest=knob_dest(knob),
            metavar=knob.name.upper(),
            type=str,
            default=argparse.SUPPRESS,
            help=f"{knob.help}: the knob of --arch {', '.join(archs)} (default: {shown})",
        )
    parser.add_argument(dict_flag, dest="dict", type=str, default=argparse.SUPPRESS, help=dict_help)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="'report': the 2022 report's settings (Adam 1e-3, batch 256, per-latent "
        "L1, nn.Linear-style encoder init); flags given explicitly still win",
    )
    parser.add_argument(
        "--wandb",
        choices=["offline", "online", "disabled"],
        default=None,
        help="W&B mode (default: $WANDB_MODE, else offline; online needs `wandb login`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(parser, SAETrainConfig, skip=SKIP + skip, defaults=defaults)


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


def knob_dest(knob) -> str:
    """Where argparse keeps a knob flag's text: --l0-coef -> knob_l0_coef."""
    return "knob_" + knob.flag.lstrip("-").replace("-", "_")


def sae_config(
    args: argparse.Namespace,
    *,
    base: SAETrainConfig,
    dict_base: int,
    knob_defaults: dict[str, list],
    default_dict: str,
    bare: str = "absolute",
) -> tuple[SAETrainConfig, dict[int, str]]:
    """Defaults < preset < explicit flags; returns the config and each size's label.

    The knob's values: its flag, else the family's own defaults where it has them (another
    scale than the command's), else the command's ``knob_defaults`` for the knob's name, else
    the knob's. Default L1 values are in ``base.l1_norm``'s convention; when a preset or flag
    switches the convention and no --l1 is given, they are converted (at 1x of ``dict_base``)
    and the run says so, rather than reading sum-convention values as per-latent ones.
    """
    try:
        sizes = parse_dict_sizes(getattr(args, "dict", None) or default_dict, dict_base, bare=bare)
        arch = getattr(args, "arch", base.arch)
        family = get_family(arch)
        knob = family.knob
        refuse_other_knobs(args, arch)
        # the base's values are its own architecture's knob: this one's come below
        base = dataclasses.replace(base, arch=arch, sparsity=None)
        cfg = replace_from_args(apply_preset(base, args.preset), args, skip=SKIP)
        given = getattr(args, knob_dest(knob), None)
        if given:
            values = knob.parse(given)
        elif family.default_values is not None:
            values = list(family.default_values)  # its scale is not the command's
        else:
            values = list(knob_defaults.get(knob.name, knob.defaults))
            if knob.all_value is not None:  # a basis's default sweep: and every coefficient
                values.append(knob.all_value)
            if "l1_norm" in family.settings and cfg.l1_norm != base.l1_norm:
                values = convert_l1(values, have=base.l1_norm, want=cfg.l1_norm, base=dict_base)
                print(
                    f"L1 convention {cfg.l1_norm}: default L1 values converted from the "
                    f"{base.l1_norm} convention at {dict_base} latents: {values}"
                )
        cfg = dataclasses.replace(cfg, sparsity=values, dict_sizes=[n for _, n in sizes])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return cfg, {n: label for label, n in sizes}


def grid_size_text(cfg: SAETrainConfig) -> str:
    """e.g. '4 L1 x 3 sizes = 12 relu SAEs' or '3 k x 2 sizes = 6 topk SAEs'."""
    knob = cfg.family.knob.label
    n_knob, n_size = len(cfg.sparsity), len(cfg.dict_sizes)
    return f"{n_knob} {knob} x {n_size} sizes = {n_knob * n_size} {cfg.arch} SAEs"


def knob_text(row: dict) -> str:
    """A summary row's knob as messages write it: 'L1 0.001' or 'topk k 8' (the default
    architecture, the report's relu, goes without its name, as it always has)."""
    arch = row.get("arch", DEFAULT_ARCH)
    knob = get_family(arch).knob
    value = knob.text(row.get("sparsity", row.get("l1")))
    return f"{knob.label} {value}" if arch == DEFAULT_ARCH else f"{arch} {knob.label} {value}"


def refuse_other_knobs(args: argparse.Namespace, arch: str) -> None:
    """A knob flag of another architecture than ``arch`` is refused rather than silently
    ignored."""
    mine = get_family(arch).knob
    for flag, knob in knobs().items():
        if flag != mine.flag and getattr(args, knob_dest(knob), None):
            takes = "; ".join(
                f"{fl}: {', '.join(a for a, f in FAMILIES.items() if f.knob.flag == fl)}"
                for fl in knobs()
            )
            raise ValueError(
                f"{flag} is not a knob of --arch {arch}; its knob is {mine.flag} ({takes})"
            )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=distributed.DEVICE_HELP)
    parser.add_argument(
        "--parallel",
        choices=parallel.MODES,
        default="grid",
        help="under torchrun: 'grid' deals the dictionary sizes out to the processes "
        "(bit-identical to one process), 'data' gives every process a slice of each "
        "batch and averages gradients (one grid too big for one device)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=1000,
        help="steps between checkpoints (also saved on Ctrl-C/SIGTERM); 0: only then",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start over even if the output folder holds a run with other settings",
    )


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
        f"what {shown} holds (every node must see the same --out folder)",
        (None if meta is None else meta["step"], finished),
    )
    if force:
        meta = None
    elif meta is not None:
        try:
            check_compatible(meta, cfg, int(source.d), source_info)
        except CheckpointMismatch as exc:
            raise UserError(
                f"{shown} holds an unfinished run made otherwise ({exc}); rerun with "
                "its settings and data to resume it, choose another --out, or add "
                "--force to start over"
            ) from None
    elif finished:
        problems = _finished_differences(out, cfg, source_info)
        if not problems:
            print(
                f"{shown} already holds this grid (same settings, data and budget), finished; "
                "add --force to train it again"
            )
            return None, read_summary(out / layout.SUMMARY_FILE)
        raise UserError(
            f"{shown} holds a finished grid made otherwise: {'; '.join(problems)}. "
            "Choose another --out, or add --force to replace it"
        )
    state = new_state(source, cfg, device=placement.device, sharding=sharding)
    if meta is not None:
        try:
            load_checkpoint(state, ckpt, source_info)
        except CheckpointDamaged as exc:
            raise UserError(
                f"{exc}: it is not whole, so it is not resumed from; add --force to start "
                "over (or restore it from a copy)"
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


def check_run_folder(out) -> None:
    """Before any work: one clear error if a run folder on object storage cannot be used."""
    if not storage.is_remote(out):
        return
    world = os.environ.get("WORLD_SIZE", "1")
    if distributed.launched_by_torchrun() and os.environ.get("LOCAL_WORLD_SIZE", world) != world:
        # Rank 0 downloads the run into its node's mirror; ranks on other nodes would not see it.
        raise UserError(
            f"--out {out} is on object storage, which a run over several nodes "
            "cannot share (only rank 0's node would see the downloaded run); give a "
            "folder on a filesystem every node mounts"
        )
    storage.check_access(out)


@contextlib.contextmanager
def locked_run(out, device: str):
    """This rank's placement (``distributed.setup``), with the run folder ``out`` locked until
    the command is done (``unsuperpose.locking``): a second run into it is refused at once."""
    check_run_folder(out)
    placement = distributed.setup(device)
    with locking.hold(out, what=f"the run folder {out}"):
        yield placement


class RunMirror:
    """A run folder on object storage, worked on in a local folder and copied up to its URL.

    Training writes plain files (safetensors, renames that make checkpoints atomic, W&B's own
    files), so a run whose --out is a URL works in ``$UNSUPERPOSE_CACHE/runs-mirror/<hash of
    the URL>``, started from what the URL holds, and copies it up after every checkpoint (a
    killed run resumes from the URL on any machine) and at the end. Rank 0 alone copies; the
    ranks of one node share the mirror.

    Each copy sends only the files that changed since the last one (their size and SHA-256, in
    ``<mirror>.uploaded.json`` beside the mirror, never uploaded) and deletes from the URL the
    files the run removed since; files on the URL the mirror never held are left alone.
    """

    def __init__(self, url: storage.ObjectPath):
        self.url = url
        root = Path(os.environ.get("UNSUPERPOSE_CACHE", "runs/cache"))
        self.folder = root / "runs-mirror" / hashlib.sha256(str(url).encode()).hexdigest()[:16]
        self.manifest = self.folder.with_name(self.folder.name + ".uploaded.json")

    def _holds_run(self) -> bool:
        return storage.exists(self.url / CHECKPOINT_DIR) or (
            storage.exists(self.url / layout.SUMMARY_FILE)
            and storage.exists(self.url / layout.CONFIG_FILE)
        )

    def pull(self, force: bool = False) -> None:
        """The mirror becomes what the URL holds: its run, or nothing (a stale mirror is replaced,
        so the identity checks judge the URL's run, never an older local copy). ``force``: the
        URL's checkpoint goes now, as --force deletes a local one before training."""
        if distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
            self.manifest.unlink(missing_ok=True)
            if force:
                storage.remove_tree(self.url / CHECKPOINT_DIR, first="state.json")
            if self._holds_run():
                print(f"{self.url} holds a run: downloading it to compare with this one")
                storage.download_tree(self.url, self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            # What was downloaded is on the URL already: a copy up sends only what changes.
            self._save_manifest({f: self._stat(f) for f in self._files()})
        distributed.barrier()

    # -- what was copied up: path -> [size, mtime_ns, sha256] ----------------------------------

    def _load_manifest(self) -> dict[str, list]:
        try:
            return json.loads(self.manifest.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save_manifest(self, manifest: dict[str, list]) -> None:
        write_text_atomic(self.manifest, json.dumps(manifest, sort_keys=True))

    def _stat(self, rel: str, known: list | None = None) -> list:
        """``rel``'s [size, mtime_ns, sha256]; the hash is reused from ``known`` when neither
        the size nor the modification time changed."""
        st = (self.folder / rel).stat()
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return list(known)
        digest = hashlib.sha256()
        with open(self.folder / rel, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return [st.st_size, st.st_mtime_ns, digest.hexdigest()]

    def _changes(self) -> tuple[dict[str, list], dict[str, list], list[str], list[str]]:
        """(manifest, the files' state now, files changed or new, files removed since)."""
        manifest = self._load_manifest()
        now = {f: self._stat(f, manifest.get(f)) for f in self._files()}
        changed = [f for f in sorted(now) if f not in manifest or manifest[f][::2] != now[f][::2]]
        removed = sorted(f for f in manifest if f not in now)
        return manifest, now, changed, removed

    def _delete(self, files: list[str]) -> None:
        for f in files:
            storage.remove_tree(self.url / f)

    def _files(self) -> list[str]:
        # checkpoint.tmp / checkpoint.old are a local save in progress, never copied up.
        return [
            f
            for f in storage.list_files(self.folder)
            if not f.split("/", 1)[0].startswith(CHECKPOINT_DIR + ".")
        ]

    def upload_checkpoint(self) -> None:
        """Rank 0, each time the Checkpointer has written one: the checkpoint up, with the files
        beside it. Its state.json is deleted first and copied last, so a copy cut short leaves
        a checkpoint without state.json (not resumed; the run starts over), never new weights
        under an old step."""
        locking.check_held(self.url)  # a run that lost its lease leaves the URL to the new holder
        meta = f"{CHECKPOINT_DIR}/state.json"
        manifest, now, changed, removed = self._changes()
        storage.remove_tree(self.url / meta)
        manifest.pop(meta, None)
        self._save_manifest(manifest)  # state.json is gone from the URL, whatever follows
        storage.upload_tree(self.folder, self.url, [f for f in changed if f != meta])
        self._delete([f for f in removed if f != meta])
        if meta in now:
            storage.upload_tree(self.folder, self.url, [meta])
        self._save_manifest(now)

    def push(self) -> None:
        """Rank 0, at the end: the whole run up; then the URL's checkpoint goes, as a local run's
        does (state.json first, so a removal cut short is not taken for a checkpoint)."""
        locking.check_held(self.url)
        _, now, changed, removed = self._changes()
        storage.upload_tree(self.folder, self.url, changed)
        storage.remove_tree(self.url / CHECKPOINT_DIR, first="state.json")
        self._delete([f for f in removed if f.split("/", 1)[0] != CHECKPOINT_DIR])
        self._save_manifest(now)


def train_and_save(source, cfg: SAETrainConfig, out, **kw) -> list[dict]:
    """Train the grid into ``out``, a folder or an object-store URL (see RunMirror); the
    arguments are ``_train_and_save``'s."""
    if not storage.is_remote(out):
        return _train_and_save(source, cfg, out, **kw)
    check_run_folder(out)
    mirror = RunMirror(out)
    mirror.pull(force=kw.get("force", False))
    rows = _train_and_save(source, cfg, mirror.folder, mirror=mirror, **kw)
    # Everything is on the URL now; the next run downloads it again, so the copy can go.
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(mirror.folder, ignore_errors=True)
        mirror.manifest.unlink(missing_ok=True)
    return rows


def _train_and_save(
    source,
    cfg: SAETrainConfig,
    out: Path,
    *,
    size_labels: dict[int, str],
    size_base: int,
    size_axis: str,
    ground_truth=None,
    callbacks: list[Callback] = (),
    wandb_mode: str | None = None,
    progress: bool = True,
    run_name: str,
    source_info: dict,
    checkpoint_every: int = 1000,
    force: bool = False,
    export=None,
    more_scores=None,
    placement: distributed.Placement | None = None,
    parallel_mode: str = "grid",
    mirror: RunMirror | None = None,
) -> list[dict]:
    """Train the grid (resuming a checkpoint if there is one), score it (with ground truth if
    given), save SAEs, summary and figures; ``export(state, out)`` may write more formats and
    ``more_scores(state)`` add columns per SAE ({(l1, n): {column: value}}, e.g. the spliced-in
    evaluation).

    Under torchrun every rank calls this; ``placement`` (``distributed.setup``) says where this
    rank runs. Rank 0 alone writes files, logs and tracks; the rows are returned on every rank.
    """
    placement = placement or distributed.setup("cpu")
    if get_family(cfg.arch).fitted:
        return _fit_and_save(
            source,
            cfg,
            out,
            size_labels=size_labels,
            size_base=size_base,
            size_axis=size_axis,
            ground_truth=ground_truth,
            wandb_mode=wandb_mode,
            progress=progress,
            run_name=run_name,
            source_info=source_info,
            force=force,
            more_scores=more_scores,
            placement=placement,
            mirror=mirror,
        )
    with stage_errors(parallel.ShardingError, {"mode": "--parallel"}):
        sharding = parallel.plan(sorted(cfg.dict_sizes), parallel_mode)
        parallel.check_batch(sharding, cfg.batch_size)
    distributed.check_same_everywhere("the settings", to_dict(cfg))
    if placement.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    run_info = {**placement.describe(), **sharding.describe()}
    out.mkdir(parents=True, exist_ok=True)
    shown = out if mirror is None else mirror.url  # what messages call the run folder
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
            raise UserError(f"{exc}; {where}") from None
        state = whole_state(state, source)
        if state is None:  # another rank's share, now with rank 0
            return distributed.broadcast_object(None)
        rows = _score_and_save(
            state,
            evaluate(state, source),
            out,
            tracker,
            ground_truth=ground_truth,
            size_base=size_base,
            more_scores=more_scores,
            export=export,
            history=state.history,
            size_labels=size_labels,
            size_axis=size_axis,
            source_info=source_info,
            run_info=run_info,
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
    *,
    ground_truth,
    size_base: int,
    more_scores,
    size_labels: dict[int, str],
    size_axis: str,
    source_info: dict,
    run_info: dict,
    info: dict | None = None,
    export=None,
    history=(),
) -> list[dict]:
    """Rank 0, once a grid is trained or fitted and evaluated: score every dictionary (against
    ``ground_truth`` when given), add ``info`` and ``more_scores(state)``'s columns per key,
    write the dictionaries, summary and figures (``export`` may add formats), and hand the
    summary and figures to the tracker. Returns the summary's rows."""
    scores = score_grid(state.dictionaries(), metrics, ground_truth)
    for key, s in scores.items():
        s.update((info or {}).get(key, {}), dict_ratio=key[1] / size_base)
    if more_scores is not None:
        for key, extra in more_scores(state).items():
            scores[key].update(extra)
    rows = save_grid(
        state,
        metrics,
        out,
        extra=scores,
        labels=size_labels,
        source_info=source_info,
        run_info=run_info,
    )
    if export is not None:
        export(state, out)
    figures = grid_figures(
        rows, list(history), out / layout.FIGURES_DIR, size_axis=size_axis, size_labels=size_labels
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
    size_labels: dict[int, str],
    size_base: int,
    size_axis: str,
    ground_truth,
    wandb_mode: str | None,
    progress: bool,
    run_name: str,
    source_info: dict,
    force: bool,
    more_scores,
    placement: distributed.Placement,
    mirror: RunMirror | None,
) -> list[dict]:
    """``_train_and_save`` for a fitted baseline (``train.fitted``): no steps, no checkpoint.

    The same identity rules: a finished folder with these settings, data and budget is returned
    as it is, one made otherwise is refused (or replaced with ``force``). Rank 0 fits and
    writes; the other ranks get its rows.
    """
    shown = out if mirror is None else mirror.url
    family = get_family(cfg.arch)
    if family.check_sizes is not None:  # before anything is written
        try:
            family.check_sizes(int(source.d), sorted(cfg.dict_sizes))
        except ValueError as exc:
            raise UserError(
                f"{exc}: choose smaller dictionary sizes for --arch {cfg.arch}"
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    if layout.is_finished(out) and not force:
        problems = _finished_differences(out, cfg, source_info)
        if not problems:
            print(f"{shown} already holds this fit (same settings, data and budget); add --force")
            return read_summary(out / layout.SUMMARY_FILE)
        raise UserError(
            f"{shown} holds a finished grid made otherwise: {'; '.join(problems)}. "
            "Choose another --out, or add --force to replace it"
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
            state,
            evaluate(state, source),
            out,
            tracker,
            ground_truth=ground_truth,
            size_base=size_base,
            more_scores=more_scores,
            info=state.info,
            size_labels=size_labels,
            size_axis=size_axis,
            source_info=source_info,
            run_info=run_info,
        )
    if mirror is not None:
        mirror.push()
    return distributed.broadcast_object(rows)
