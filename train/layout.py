"""Every file and folder name of a dictionary run folder, and the globs that find them.

<out>/
  train_config.json        the SAETrainConfig, and how the run was made (device, ranks)
  source.json              what the grid was trained on (the source's describe(), fingerprint)
  summary.csv              one row per dictionary: arch, sparsity_name, sparsity, dict_size, ...
  history.jsonl            training scalars and callback values over steps
  wandb_run_id             the W&B run a resumed run continues
  checkpoint/              the resumable state while training (gone when the run is finished)
  figures/                 the grid's figures
  saes/<arch>-n<size>-<knob>_<value>/   one dictionary: sae.safetensors + config.json, and
                           latents.safetensors (per latent: fires on the held-out rows,
                           training steps since it last fired; runs before it have none)
  saelens/<same name>/     the same dictionaries in SAELens's format (LM runs)

`unsuperpose train` keeps each grid of a store in a set folder named for its --dict, and the
report of a store's sets in a folder named for the LM and layer; both carry the architecture as
a suffix, except for relu's (``registry.DEFAULT_ARCH``), named as they were before there were
others:
  <runs>/sae/<lm>/layer<L>/<DICT>/ and <arch>-<DICT>/      (``set_dirname``)
  <runs>/report/<lm>-layer<L>/ and <lm>-layer<L>-<arch>/   (``report_dirname``)

Runs written before architectures existed name their dictionaries ``n<size>-l1_<value>``; they
are found by the same glob (a folder under saes/ holding both files) and read as ReLU SAEs.
"""

from __future__ import annotations

from pathlib import Path

from unsuperpose.train.dictionary import (
    CONFIG_FILE as DICT_CONFIG_FILE,
    WEIGHTS_FILE as DICT_WEIGHTS_FILE,
)
from unsuperpose.train.registry import DEFAULT_ARCH

CONFIG_FILE = "train_config.json"
SOURCE_FILE = "source.json"
SUMMARY_FILE = "summary.csv"
HISTORY_FILE = "history.jsonl"
RUN_ID_FILE = "wandb_run_id"
CHECKPOINT_DIR = "checkpoint"
FIGURES_DIR = "figures"
SAES_DIR = "saes"
SAELENS_DIR = "saelens"
LATENTS_FILE = "latents.safetensors"

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "DICT_CONFIG_FILE",
    "DICT_WEIGHTS_FILE",
    "FIGURES_DIR",
    "HISTORY_FILE",
    "LATENTS_FILE",
    "RUN_ID_FILE",
    "SAELENS_DIR",
    "SAES_DIR",
    "SOURCE_FILE",
    "SUMMARY_FILE",
    "dict_dirname",
    "dictionary_dirs",
    "holds_dictionaries",
    "is_complete",
    "is_finished",
    "knob_value_text",
    "report_dirname",
    "set_dict_spec",
    "set_dirname",
]


def knob_value_text(knob: str, value: float) -> str:
    """A knob value as names and messages write it: k 0 is a basis keeping every coefficient
    (`--topk all`; no SAE has k 0)."""
    return "all" if knob == "k" and value == 0 else f"{value:g}"


def dict_dirname(arch: str, knob: str, value: float, n: int) -> str:
    """The folder of one dictionary: architecture, size, knob and value, e.g. topk-n1024-k_32,
    pca-n256-k_all."""
    return f"{arch}-n{n}-{knob}_{knob_value_text(knob, value)}"


def set_dirname(dict_spec: str, arch: str) -> str:
    """The set folder of a grid trained with --dict ``dict_spec``: '1x,2x' -> '1x+2x' for relu,
    'topk-1x+2x' for topk (so grids of two architectures never share a folder)."""
    folder = dict_spec.replace(",", "+").replace("/", "_")
    return folder if arch == DEFAULT_ARCH else f"{arch}-{folder}"


def set_dict_spec(dirname: str, arch: str) -> str:
    """The --dict a set folder was named for ('topk-1x+2x' -> '1x,2x'; a ratio's '/' written
    '_' in the name stays so)."""
    spec = dirname if arch == DEFAULT_ARCH else dirname.removeprefix(f"{arch}-")
    return spec.replace("+", ",")


def report_dirname(lm: str, layer, arch: str) -> str:
    """The report folder of a store's sets of one architecture: 'tiny-layer1' for relu,
    'tiny-layer1-topk' for topk."""
    return f"{lm}-layer{layer}" + ("" if arch == DEFAULT_ARCH else f"-{arch}")


def dictionary_dirs(out: str | Path) -> list[Path]:
    """Every complete dictionary folder under ``<out>/saes`` (both files written), sorted."""
    root = Path(out) / SAES_DIR
    if not root.is_dir():
        return []
    return sorted(
        p.parent
        for p in root.glob(f"*/{DICT_CONFIG_FILE}")
        if (p.parent / DICT_WEIGHTS_FILE).exists()
    )


def holds_dictionaries(out: str | Path) -> bool:
    return bool(dictionary_dirs(out))


def is_finished(out: str | Path) -> bool:
    """A grid folder whose summary and settings are written (its dictionaries with them)."""
    out = Path(out)
    return (out / SUMMARY_FILE).exists() and (out / CONFIG_FILE).exists()


def is_complete(out: str | Path) -> bool:
    """A finished grid folder with no checkpoint left: a rerun of its command has nothing to
    resume (a checkpoint beside a summary is a run that was grown or restarted, and wins)."""
    return is_finished(out) and not (Path(out) / CHECKPOINT_DIR).exists()
