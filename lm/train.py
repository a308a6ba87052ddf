"""Train the LM: AdamW, warm-up + cosine, gradient accumulation, validation, exact resume.

The loop is deliberately plain; what makes it fast on a CPU is the loss (loss.py), and what
makes it resumable is that the learning rate and the batch are functions of the step
(schedule.py) while everything else lives in one checkpoint (checkpoint.py). The finished model
is written with save_model, whose ``model.safetensors`` appears last: until then the output
directory reads as unfinished, and running the same command again resumes it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unsuperpose import distributed
from unsuperpose.config import write_json_atomic
from unsuperpose.lm.checkpoint import CHECKPOINT, load_checkpoint, restore_rng, save_checkpoint
from unsuperpose.lm.config import LMConfig, TrainLMConfig
from unsuperpose.lm.corpus import CorpusConfig
from unsuperpose.lm.errors import ModelError, RunExists
from unsuperpose.lm.loss import model_loss
from unsuperpose.lm.model import (
    WEIGHTS,
    build_model,
    check_n_ctx,
    lm_config_of,
    load_model,
    save_model,
)
from unsuperpose.lm.schedule import BlockOrder, lr_at, total_steps
from unsuperpose.lm.tokens import TokenBlocks, describe, token_blocks, unigram_entropy
from unsuperpose.tracking import Tracker

# Fields that change nothing about the trained weights: a run may resume with different values.
_FREE_FIELDS = (
    "stop_at_step",
    "threads",
    "wandb",
    "token_cache",
    "eval_every",
    "eval_blocks",
    "checkpoint_every",
)


def _as_tensor(blocks: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(blocks.astype(np.int64)).to(device)


def evaluate(
    model, blocks: np.ndarray, *, micro_batch: int, chunk: int, device: str = "cpu"
) -> float:
    """Mean next-token loss over ``blocks`` (every block has the same number of targets)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), micro_batch):
            part = blocks[start : start + micro_batch]
            total += model_loss(model, _as_tensor(part, device), chunk).item() * len(part)
    model.train(was_training)
    return total / len(blocks)


def _optimizer(model, cfg: TrainLMConfig) -> torch.optim.AdamW:
    # Decay matrices and embeddings, not biases or LayerNorm gains (GPT-2 / nanoGPT practice).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def _run_identity(
    lm: LMConfig,
    train: TrainLMConfig,
    corpus: CorpusConfig,
    data: TokenBlocks,
    init_from: str | None,
) -> dict:
    knobs = {k: v for k, v in dataclasses.asdict(train).items() if k not in _FREE_FIELDS}
    return {
        "lm": dataclasses.asdict(lm),
        "train": knobs,
        "corpus": dataclasses.asdict(corpus),
        "data": data.fingerprint,
        "init_from": init_from,
    }


def _prepare_out(out: Path, overwrite: bool) -> None:
    if (out / WEIGHTS).exists():
        if not overwrite:
            raise RunExists(
                f"{out} already holds a trained model; train it again with overwrite=True, "
                "or into another folder"
            )
        (out / WEIGHTS).unlink()
    if overwrite:
        for name in (CHECKPOINT, "log.jsonl"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "wandb", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _initial_model(lm: LMConfig, train: TrainLMConfig, init_from: str | None):
    if init_from is None:
        return build_model(lm, train.seed)
    model = load_model(init_from, attn_implementation="sdpa")
    have = lm_config_of(model)
    check_n_ctx({"n_ctx": have.n_ctx}, lm.n_ctx)
    if dataclasses.replace(have, preset=lm.preset, dropout=lm.dropout, n_ctx=lm.n_ctx) != lm:
        differ = [
            f"{f.name}={getattr(have, f.name)!r}, not {getattr(lm, f.name)!r}"
            for f in dataclasses.fields(lm)
            if f.name not in ("preset", "dropout", "n_ctx")
            and getattr(have, f.name) != getattr(lm, f.name)
        ]
        raise ModelError(
            f"{init_from}: its architecture differs from the one asked for (it has "
            f"{'; '.join(differ)}); train on from it with its own architecture"
        )
    return model


def train_lm(
    lm: LMConfig,
    train: TrainLMConfig,
    corpus: CorpusConfig,
    out_dir: str | Path,
    *,
    init_from: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train (or resume training) an LM into ``out_dir``; returns the final metrics.

    ``init_from`` starts from the weights of a saved GPT-2-style model (its architecture must
    match ``lm``) instead of a random init. Stops early, with a checkpoint, at ``stop_at_step``.
    """
    if distributed.world_size() > 1 or distributed.launched_by_torchrun():
        raise RuntimeError(
            "train_lm runs in one process (the LM presets are small); call it outside "
            "torchrun, on a GPU device for speed"
        )
    # Resolved once, here: the checkpoint and the run's config record the device it ran on.
    train = dataclasses.replace(train, device=str(distributed.resolve_device(train.device)))
    threads = torch.get_num_threads()
    if train.threads:
        torch.set_num_threads(train.threads)
    try:
        return _train(lm, train, corpus, Path(out_dir), init_from, overwrite, progress)
    finally:
        torch.set_num_threads(
            threads
        )  # a library call should not leave the process's threads changed


def _train(
    lm: LMConfig,
    train: TrainLMConfig,
    corpus: CorpusConfig,
    out: Path,
    init_from,
    overwrite: bool,
    progress: bool,
) -> dict:
    init_from = str(Path(init_from).resolve()) if init_from is not None else None
    cache = train.token_cache
    data = token_blocks(corpus, lm.n_ctx, "train", cache_dir=cache)
    val = (
        token_blocks(corpus, lm.n_ctx, "val", cache_dir=cache) if corpus.val_fraction > 0 else None
    )
    _prepare_out(out, overwrite)

    identity = _run_identity(lm, train, corpus, data, init_from)
    state = load_checkpoint(out, identity)
    model = _initial_model(lm, train, init_from).to(train.device)
    model.train()
    optimizer = _optimizer(model, train)
    step, elapsed = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state)
        step, elapsed = state["step"], state["elapsed"]
    else:
        torch.manual_seed(train.seed)

    steps = total_steps(train, lm.n_ctx)
    order = BlockOrder(len(data), train.batch_size, train.seed)
    accum = train.batch_size // train.micro_batch
    tokens_per_step = train.batch_size * lm.n_ctx
    run_config = {
        **identity,
        "steps": steps,
        "train_blocks": describe(data),
        "val_blocks": describe(val) if val is not None else None,
    }
    write_json_atomic(out / "train_config.json", run_config)
    tracker = Tracker(
        out,
        name=out.name,
        config=run_config,
        mode=train.wandb,
        resume_id=state["wandb_id"] if state else None,
    )

    def checkpoint() -> None:
        save_checkpoint(
            out,
            step=step,
            model=model,
            optimizer=optimizer,
            identity=identity,
            wandb_id=tracker.run_id,
            elapsed=elapsed + time.perf_counter() - started,
        )

    last = steps if train.stop_at_step is None else min(steps, train.stop_at_step)
    bar = tqdm(
        total=steps * tokens_per_step,
        initial=step * tokens_per_step,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"lm {out.name}",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        while step < last:
            t0 = time.perf_counter()
            lr = lr_at(step, steps, train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = data.blocks[np.sort(order.batch(step))]
            loss_sum = 0.0
            for micro in range(accum):
                x = _as_tensor(
                    batch[micro * train.micro_batch : (micro + 1) * train.micro_batch], train.device
                )
                loss = model_loss(model, x, train.loss_chunk) / accum
                loss.backward()
                loss_sum += loss.item()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip).item()
                if train.grad_clip > 0
                else float("nan")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            metrics = {
                "train/loss": loss_sum,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/tokens": step * tokens_per_step,
                "train/epoch": order.epoch_of(step),
                "train/tokens_per_s": tokens_per_step / dt,
            }
            if val is not None and (step % train.eval_every == 0) and step < steps:
                metrics["val/loss"] = evaluate(
                    model,
                    val.blocks[: train.eval_blocks],
                    micro_batch=train.micro_batch,
                    chunk=train.loss_chunk,
                    device=train.device,
                )
            tracker.log(metrics, step=step)
            bar.update(tokens_per_step)
            bar.set_postfix(
                {
                    k.split("/")[1]: f"{metrics[k]:.3f}"
                    for k in ("train/loss", "val/loss")
                    if k in metrics
                }
            )
            if step % train.checkpoint_every == 0 and step < last:
                checkpoint()
        if step < steps:
            checkpoint()
            return {"step": step, "steps": steps, "finished": False}
        return _finish(
            model,
            lm,
            train,
            corpus,
            out,
            data,
            val,
            tracker,
            steps,
            init_from,
            elapsed + time.perf_counter() - started,
        )
    finally:
        bar.close()
        tracker.finish()


def _finish(model, lm, train, corpus, out, data, val, tracker, steps, init_from, seconds) -> dict:
    final = {
        "step": steps,
        "steps": steps,
        "finished": True,
        "train_tokens": steps * train.batch_size * lm.n_ctx,
        "train_seconds": round(seconds, 1),
        "unigram_entropy": unigram_entropy(data.blocks),
    }
    if val is not None:
        final["val_loss"] = evaluate(
            model,
            val.blocks,
            micro_batch=train.micro_batch,
            chunk=train.loss_chunk,
            device=train.device,
        )
        tracker.log({"val/loss": final["val_loss"]}, step=steps)
    tracker.summary(final)
    model.to("cpu")
    save_model(
        model,
        out,
        corpus=corpus,
        lm_config=lm,
        extra={
            "train": dataclasses.asdict(train),
            "init_from": init_from,
            "final": final,
            "train_fingerprint": data.fingerprint,
        },
    )
    (out / CHECKPOINT).unlink(
        missing_ok=True
    )  # the model is saved; the optimizer state is no longer needed
    return final
