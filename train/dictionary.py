"""What every trained dictionary is, whatever its architecture: the protocol and its one loader.

A dictionary maps activations x (…, d_in) to codes (…, d_sae) with ``encode`` and back with
``decode``; ``atoms()`` are its unit decoder directions (d_sae, d_in), what MMCS, MCC and the
browser compare. On disk it is a folder: ``sae.safetensors`` (named tensors, never pickles) and
``config.json`` whose ``arch`` tag names the class that reads it back. ``load_dictionary`` finds
that class in the registry (``train.registry``: the family of that name); a folder written before
the tag existed is a ReLU SAE.

The SAEs with a decoder bias (every architecture but the report's ReLU + L1 one) share
``AffineSAE``: codes = act((x - b_dec) @ W_enc + b_enc), x_hat = codes @ W_dec + b_dec, the
layout SAELens and sparsify use, so export is a copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn

from unsuperpose.config import write_bytes_atomic, write_json_atomic
from unsuperpose.train.registry import DEFAULT_ARCH, FAMILIES

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


@runtime_checkable
class Dictionary(Protocol):
    arch: str
    d_in: int
    d_sae: int
    config: dict

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    def atoms(self) -> torch.Tensor: ...

    def save(self, directory: str | Path, config: dict | None = None) -> Path: ...


def read_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"{directory} is not a saved dictionary: it needs {WEIGHTS_FILE} and "
            f"{CONFIG_FILE} (written by `unsuperpose toy` / `unsuperpose train`)"
        )
    return json.loads((directory / CONFIG_FILE).read_text())


def load_dictionary(directory: str | Path):
    """Any saved dictionary, as the class its ``arch`` tag names (``encode``, ``decode``,
    ``atoms``): the dictionary class of the registered family of that name."""
    config = read_config(directory)
    arch = config.get("arch", DEFAULT_ARCH)
    if arch not in FAMILIES:
        raise ValueError(
            f"{directory} holds a dictionary of architecture {arch!r}, which this version of "
            f"unsuperpose does not know (it knows {sorted(FAMILIES)})"
        )
    return FAMILIES[arch].dictionary.load(directory)


def write_dictionary(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """The folder layout every dictionary class saves to; a reader never sees half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    write_bytes_atomic(directory / WEIGHTS_FILE, safetensors_bytes(cpu))
    write_json_atomic(directory / CONFIG_FILE, config)
    return directory


class StoredDictionary(nn.Module):
    """A dictionary that is the named tensors it saves (``tensors()``) and a config: built from
    the two (``cls(tensors, config)``), saved as them, loaded back from them. ``forward``
    returns (reconstruction, codes), as the trainer and the splice expect."""

    arch: ClassVar[str]
    d_in: int
    d_sae: int
    config: dict

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def identity(self) -> dict:
        """What ``config.json`` must say about this dictionary, whatever else it carries."""
        return {"arch": self.arch, "d_in": self.d_in, "d_sae": self.d_sae}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encode(x)
        return self.decode(codes), codes

    def save(self, directory: str | Path, config: dict | None = None) -> Path:
        meta = {**self.config, **(config or {}), **self.identity()}
        return write_dictionary(directory, self.tensors(), meta)

    @classmethod
    def load(cls, directory: str | Path):
        config = read_config(directory)
        return cls(load_file(str(Path(directory) / WEIGHTS_FILE)), config)


class AffineSAE(StoredDictionary):
    """An SAE with a decoder bias; subclasses say how pre-activations become codes (``act``).

    The decoder rows are stored with unit norm (training keeps them there), so ``atoms`` is
    ``W_dec`` itself.
    """

    arch: ClassVar[str]
    # Extra tensors a subclass saves beside W_enc, b_enc, W_dec and b_dec.
    extra_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict):
        super().__init__()
        self.d_in, self.d_sae = tensors["W_enc"].shape
        self.W_enc = nn.Parameter(tensors["W_enc"].clone())
        self.b_enc = nn.Parameter(tensors["b_enc"].clone())
        self.W_dec = nn.Parameter(tensors["W_dec"].clone())
        self.b_dec = nn.Parameter(tensors["b_dec"].clone())
        for name in self.extra_tensors:
            self.register_buffer(name, tensors[name].clone())
        self.config = dict(config)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def atoms(self) -> torch.Tensor:
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True)

    def dictionary(self) -> torch.Tensor:  # the name the ReLU SAE has always used
        return self.atoms()

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("W_enc", "b_enc", "W_dec", "b_dec", *self.extra_tensors)
        return {k: getattr(self, k) for k in names}
