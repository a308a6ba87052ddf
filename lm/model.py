"""The model as files: build, save, load (transformers or TransformerLens) and describe.

A model directory is exactly what ``GPT2LMHeadModel.save_pretrained`` writes (config.json +
model.safetensors) plus the tokenizer files and ``lm_config.json`` (architecture, corpus it was
trained on, and anything the caller adds). Any tool that reads HF GPT-2 checkpoints reads it, and
TransformerLens 4's ``TransformerBridge`` wraps the very same module, so no conversion exists
to drift. ``model.safetensors`` is moved into place last: its presence means the directory is
complete (the Makefile and later stages rely on that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from unsuperpose.config import write_json_atomic
from unsuperpose.errors import UserError
from unsuperpose.lm.config import LMConfig
from unsuperpose.lm.corpus import CorpusConfig
from unsuperpose.lm.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

WEIGHTS = "model.safetensors"
META = "lm_config.json"


def _hf_config(cfg: LMConfig):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB_SIZE, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.d_mlp, activation_function=cfg.activation,
                      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      bos_token_id=EOT_ID, eos_token_id=EOT_ID, tie_word_embeddings=True)


def build_model(cfg: LMConfig, seed: int = 0):
    """A randomly initialised ``GPT2LMHeadModel`` (GPT-2's init), identical for the same seed."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = _hf_config(cfg)
        # sdpa attention trains faster; loaders choose their own (load_model picks eager).
        config._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(config)
    return model


def _lm_config_from_hf(c: dict, preset: str) -> LMConfig:
    return LMConfig(preset=preset, n_layer=c["n_layer"], d_model=c["n_embd"], n_head=c["n_head"],
                    d_mlp=c.get("n_inner") or 4 * c["n_embd"], n_ctx=c["n_positions"],
                    activation=c.get("activation_function", "gelu_new"), dropout=float(c.get("resid_pdrop", 0.0)))


def lm_config_of(model, *, preset: str = "custom") -> LMConfig:
    """The LMConfig describing an HF GPT-2 model (used for adopted models and provenance)."""
    return _lm_config_from_hf(model.config.to_dict(), preset)


def model_lm_config(model_dir: str | Path, *, preset: str = "custom") -> LMConfig:
    """The LMConfig of a saved GPT-2-style model directory, read from its config.json alone."""
    return _lm_config_from_hf(_check_model_dir(Path(model_dir)), preset)


def save_model(model, out_dir: str | Path, *, corpus: CorpusConfig | None = None, extra: dict | None = None,
               lm_config: LMConfig | None = None) -> Path:
    """Write the model directory; an interrupted save never leaves ``model.safetensors`` behind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".saving-"))
    try:
        model.save_pretrained(tmp)
        get_tokenizer().save_pretrained(tmp)
        meta = {"lm": dataclasses.asdict(lm_config or lm_config_of(model)),
                "corpus": dataclasses.asdict(corpus) if corpus is not None else None,
                "extra": extra or {}}
        write_json_atomic(tmp / META, meta)
        # The old weights go first, so a crash below leaves a directory that reads as incomplete.
        (out / WEIGHTS).unlink(missing_ok=True)
        for item in tmp.iterdir():
            if item.name != WEIGHTS:
                if (out / item.name).is_dir():
                    shutil.rmtree(out / item.name)
                os.replace(item, out / item.name)
        os.replace(tmp / WEIGHTS, out / WEIGHTS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_model_dir(path: Path) -> dict:
    """The HF config of a GPT-2-style model dir, or a UserError that says what is wrong."""
    if not path.is_dir():
        raise UserError(f"{path}: no such model directory; train one with `unsuperpose lm train --out {path}`")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json, so not a Hugging Face model directory "
                        "(save one with save_pretrained, or train one with `unsuperpose lm train`)")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}/config.json is not valid JSON ({exc.msg})") from None
    if config.get("model_type") != "gpt2":
        raise UserError(f"{path}: model_type is {config.get('model_type')!r}; only GPT-2-style models "
                        "(model_type 'gpt2') are supported")
    if config.get("vocab_size") != VOCAB_SIZE:
        raise UserError(f"{path}: vocabulary of {config.get('vocab_size')} tokens; the pipeline uses GPT-2's "
                        f"tokenizer, so the model must have {VOCAB_SIZE}")
    if not (path / WEIGHTS).is_file() and not (path / "pytorch_model.bin").is_file():
        raise UserError(f"{path}: no {WEIGHTS} (an unfinished save or training run?); "
                        "finish it by running the same command again")
    return config


def load_model(model_dir: str | Path, *, attn_implementation: str = "eager"):
    """The saved ``GPT2LMHeadModel``: float32, CPU, eval mode.

    Eager attention by default because TransformerLens's bridge forces it; with the same kernels
    both paths give the same logits to float precision.
    """
    from transformers import GPT2LMHeadModel

    path = Path(model_dir)
    _check_model_dir(path)
    model = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, local_files_only=True,
                                            attn_implementation=attn_implementation)
    return model.to("cpu").eval()


def load_bridge(model_dir: str | Path):
    """A TransformerLens 4 ``TransformerBridge`` around the saved model (offline; hooks like
    ``blocks.{L}.mlp.hook_post``)."""
    from transformer_lens.model_bridge import TransformerBridge

    path = Path(model_dir)
    _check_model_dir(path)
    # The tokenizer comes from the files save_model wrote beside the weights, so no hub access.
    return TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)


def weights_sha256(model_dir: str | Path) -> str:
    path = Path(model_dir) / WEIGHTS
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_info(model_dir: str | Path) -> dict:
    """What later stages record about a model: where, which weights (hash), its shape, its corpus."""
    path = Path(model_dir)
    config = _check_model_dir(path)
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    n_embd = config["n_embd"]
    return {"path": str(path.resolve()), "weights_sha256": weights_sha256(path) if (path / WEIGHTS).is_file() else None,
            "n_layer": config["n_layer"], "d_model": n_embd, "n_head": config["n_head"],
            "d_mlp": config.get("n_inner") or 4 * n_embd, "n_ctx": config["n_positions"],
            "vocab_size": config["vocab_size"], "activation": config.get("activation_function"),
            "corpus": meta.get("corpus"), "extra": meta.get("extra", {})}


def check_n_ctx(info: dict, n_ctx: int) -> None:
    """UserError unless blocks of ``n_ctx`` tokens fit the model's learned positions."""
    if n_ctx > info["n_ctx"]:
        raise UserError(f"n_ctx={n_ctx} is larger than the model's {info['n_ctx']} positions; "
                        f"use --n-ctx {info['n_ctx']} or less")


def adopt_model(from_dir: str | Path, out_dir: str | Path, *, corpus: CorpusConfig | None = None) -> Path:
    """Make an existing local HF GPT-2 model a pipeline model: validated, re-saved with our files."""
    src = Path(from_dir)
    model = load_model(src)
    extra = {"adopted_from": str(src.resolve())}
    return save_model(model, out_dir, corpus=corpus, extra=extra)
