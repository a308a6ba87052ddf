"""The model as files: build, save, load (transformers or TransformerLens) and describe.

A model directory is exactly what ``save_pretrained`` writes (config.json + model.safetensors)
plus the tokenizer files and ``lm_config.json`` (architecture, corpus it was trained on, and
anything the caller adds). Any tool that reads HF checkpoints reads it, and TransformerLens 4's
``TransformerBridge`` wraps the very same module, so no conversion exists to drift.
``model.safetensors`` is moved into place last: its presence means the directory is complete
(the Makefile and later stages rely on that).

Models we build and train are GPT-2-style; the later stages take any causal LM the bridge has an
architecture adapter for (GPT-NeoX/Pythia, Llama, ...), from a local directory or, online, a hub
name (:func:`resolve_model`), each with the tokenizer saved beside it.
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
from unsuperpose.hashing import file_sha256
from unsuperpose.lm.config import LMConfig
from unsuperpose.lm.corpus import CorpusConfig
from unsuperpose.lm.errors import ModelError
from unsuperpose.lm.tokenizer import (
    EOT_ID,
    VOCAB_SIZE,
    ModelTokenizer,
    get_tokenizer,
    load_tokenizer,
)

WEIGHTS = "model.safetensors"
META = "lm_config.json"
# What a saved model's weights may be; a sharded checkpoint is named by its index.
WEIGHT_FILES = (
    WEIGHTS,
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Hub files worth fetching: configs, tokenizers, safetensors weights (never code: no remote code
# runs).
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]


def _hf_config(cfg: LMConfig):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_mlp,
        activation_function=cfg.activation,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        tie_word_embeddings=True,
    )


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
    return LMConfig(
        preset=preset,
        n_layer=c["n_layer"],
        d_model=c["n_embd"],
        n_head=c["n_head"],
        d_mlp=c.get("n_inner") or 4 * c["n_embd"],
        n_ctx=c["n_positions"],
        activation=c.get("activation_function", "gelu_new"),
        dropout=float(c.get("resid_pdrop", 0.0)),
    )


def _shape(config) -> dict:
    """Depth and widths of any HF causal-LM config (attribute maps give GPT-2 the same names)."""
    d = int(config.hidden_size)
    d_mlp = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or getattr(config, "ffn_dim", None)
        or 4 * d
    )
    return {
        "n_layer": int(config.num_hidden_layers),
        "d_model": d,
        "n_head": int(config.num_attention_heads),
        "d_mlp": int(d_mlp),
        "n_ctx": int(getattr(config, "max_position_embeddings", 0) or 0),
        "activation": getattr(config, "hidden_act", None)
        or getattr(config, "activation_function", None),
    }


def lm_config_of(model, *, preset: str = "custom") -> LMConfig:
    """The LMConfig describing an HF model (used for adopted models and provenance); exact for
    GPT-2, the shape alone for other architectures."""
    if model.config.model_type == "gpt2":
        return _lm_config_from_hf(model.config.to_dict(), preset)
    shape = _shape(model.config)
    return LMConfig(preset=preset, **{**shape, "activation": str(shape["activation"])})


def model_lm_config(model_dir: str | Path, *, preset: str = "custom") -> LMConfig:
    """The LMConfig of a saved GPT-2-style model directory, read from its config.json alone."""
    config = _check_model_dir(Path(model_dir))
    if config.get("model_type") != "gpt2":
        raise ModelError(
            f"{model_dir}: a {config.get('model_type')!r} model; LM training trains GPT-2-style "
            "models only (its presets and loss are GPT-2's). Harvest this model as it is, or "
            "adopt it (adopt_model, `unsuperpose lm adopt`)"
        )
    return _lm_config_from_hf(config, preset)


def save_model(
    model,
    out_dir: str | Path,
    *,
    corpus: CorpusConfig | None = None,
    extra: dict | None = None,
    lm_config: LMConfig | None = None,
    tokenizer: ModelTokenizer | None = None,
) -> Path:
    """Write the model directory; an interrupted save never leaves ``model.safetensors`` behind.

    ``tokenizer``: the model's own, saved beside it (default: GPT-2's BPE).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".saving-"))
    try:
        # One weights file whatever the size: its arrival is what marks the directory complete.
        model.save_pretrained(tmp, max_shard_size="1000GB")
        (tokenizer.hf if tokenizer is not None else get_tokenizer()).save_pretrained(tmp)
        meta = {
            "lm": dataclasses.asdict(lm_config or lm_config_of(model)),
            "corpus": dataclasses.asdict(corpus) if corpus is not None else None,
            "extra": extra or {},
        }
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


def _looks_like_hub_name(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and " " not in spec


def resolve_model(spec: str | Path) -> Path:
    """A model's local directory: ``spec`` itself, or for a hub name such as
    ``EleutherAI/pythia-70m`` its snapshot in the Hugging Face cache (downloaded when online;
    configs, tokenizer and safetensors weights only, and .bin weights only where a model has no
    safetensors)."""
    path = Path(spec).expanduser()
    if path.exists() or not _looks_like_hub_name(str(spec)):
        return path
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(str(spec), allow_patterns=_HUB_FILES))
        if not any((local / f).is_file() for f in WEIGHT_FILES):
            local = Path(snapshot_download(str(spec), allow_patterns=_HUB_FILES + ["*.bin"]))
    except Exception as exc:  # the hub client raises many types; all mean "cannot get it here"
        raise ModelError(
            f"{spec}: no such local directory, and no Hugging Face hub model of that name could be "
            f"fetched ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); give a "
            "local directory saved with save_pretrained, or go online once and adopt the hub "
            "model into a local directory (adopt_model, `unsuperpose lm adopt`)"
        ) from None
    return local


def _saved_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def bridged_architecture(config: dict, path: Path) -> str:
    """The HF architecture name of a model dir's config.

    Only if TransformerLens 4 bridges it as a causal LM.
    """
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformer_lens.model_bridge.sources._hf_format import (
        determine_architecture_from_hf_config,
    )

    causal = sorted(
        a
        for a in SUPPORTED_ARCHITECTURES
        if a.endswith(("ForCausalLM", "LMHeadModel")) and not a.startswith("T5")
    )  # T5: encoder-decoder
    try:
        architecture = determine_architecture_from_hf_config(_saved_config(path))
    except (ValueError, KeyError, TypeError, OSError):  # a model_type transformers does not know
        architecture = (config.get("architectures") or [None])[0]
    if architecture not in causal:
        raise ModelError(
            f"{path}: model_type {config.get('model_type')!r} "
            f"(architecture {architecture!r}) is not a "
            "causal LM that TransformerLens 4 can bridge; supported: "
            + ", ".join(a.removesuffix("ForCausalLM") for a in causal)
        )
    return architecture


def _check_model_dir(path: Path) -> dict:
    """The HF config of a bridgeable causal-LM model dir, or a ModelError saying what is wrong."""
    if not path.is_dir():
        raise ModelError(
            f"{path}: no such model directory; train one there (`unsuperpose lm train`) or "
            "adopt one (`unsuperpose lm adopt`)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: no config.json, so not a Hugging Face model directory "
            "(save one with save_pretrained, or train one with `unsuperpose lm train`)"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}/config.json is not valid JSON ({exc.msg})") from None
    if config.get("model_type") != "gpt2":
        bridged_architecture(config, path)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(
            f"{path}: no {WEIGHTS} (an unfinished save or training run?); "
            "finish it by running the same command again"
        )
    return config


def model_tokenizer(model_dir: str | Path) -> ModelTokenizer:
    """The tokenizer that goes with a model: the one saved in its directory (a GPT-2 model with
    GPT-2's vocabulary and none saved gets GPT-2's BPE), checked against the model's vocabulary."""
    path = resolve_model(model_dir)
    config = _check_model_dir(path)
    gpt2 = config.get("model_type") == "gpt2" and config.get("vocab_size") == VOCAB_SIZE
    tok = load_tokenizer(path, gpt2_fallback=gpt2)
    if tok.vocab_size > int(config.get("vocab_size") or 0):
        raise ModelError(
            f"{model_dir}: its tokenizer has {tok.vocab_size:,} ids but the model's embedding only "
            f"{config.get('vocab_size')}; save the tokenizer the model was trained with beside it"
        )
    return tok


def load_model(model_dir: str | Path, *, attn_implementation: str = "eager"):
    """The saved causal LM (``GPT2LMHeadModel`` for ours): float32, CPU, eval mode.

    Eager attention by default because TransformerLens's bridge forces it; with the same kernels
    both paths give the same logits to float precision.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_dir)
    _check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True, attn_implementation=attn_implementation
    )
    return model.to("cpu").eval()


def load_bridge(model_dir: str | Path, device: str | torch.device = "cpu"):
    """A TransformerLens 4 ``TransformerBridge`` around the saved model (offline; hooks like
    ``blocks.{L}.mlp.hook_post``), its float32 weights on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_model(model_dir)
    _check_model_dir(path)
    # The tokenizer comes from the files saved beside the weights, so no hub access.
    return TransformerBridge.boot_transformers(str(path), device=str(device), dtype=torch.float32)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The files holding a saved model's weights (one, or a sharded checkpoint's shards)."""
    path = Path(model_dir)
    for single, index in (
        (WEIGHTS, "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / s for s in shards]
    return []


def weights_sha256(model_dir: str | Path) -> str | None:
    """sha256 of the weights file; of the shards' hashes in order for a sharded checkpoint."""
    files = weight_files(model_dir)
    if len(files) <= 1:
        return file_sha256(files[0]) if files else None
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def model_info(model_dir: str | Path) -> dict:
    """What later stages record about a model: where, which weights (hash), its shape, its
    tokenizer, its corpus."""
    path = resolve_model(model_dir)
    config = _check_model_dir(path)
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    shape = _shape(_saved_config(path))
    return {
        "path": str(path.resolve()),
        "weights_sha256": weights_sha256(path),
        **shape,
        "vocab_size": config["vocab_size"],
        "model_type": config.get("model_type"),
        "tokenizer": model_tokenizer(path).describe(),
        "corpus": meta.get("corpus"),
        "extra": meta.get("extra", {}),
    }


def saved_extra(model_dir: str | Path) -> dict | None:
    """What ``lm_config.json`` records of how a saved model was made (``train``: its budget,
    ``adopted_from``: where it was adopted from); None when no model is saved there."""
    path = Path(model_dir)
    if not (path / "model.safetensors").exists():
        return None
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    return meta.get("extra") or {}


def check_n_ctx(info: dict, n_ctx: int) -> None:
    """ModelError unless blocks of ``n_ctx`` tokens fit the model's learned positions."""
    if n_ctx > info["n_ctx"]:
        raise ModelError(
            f"n_ctx={n_ctx} is larger than the model's {info['n_ctx']} positions; "
            f"use n_ctx={info['n_ctx']} or less"
        )
