"""Sparse autoencoders and the grid trainer. Knows activation sources, never toy data or LMs."""

from unsuperpose.train.config import (
    PRESETS,
    SAETrainConfig,
    apply_preset,
    parse_dict_sizes,
    parse_l1_list,
)
from unsuperpose.train.dictionary import load_dictionary
from unsuperpose.train.families import FAMILIES, get_family
from unsuperpose.train.io import load_saes, read_history, read_summary, save_grid
from unsuperpose.train.sae import SAE
from unsuperpose.train.source import ActivationSource
from unsuperpose.train.trainer import (
    Callback,
    GridState,
    NonFiniteLoss,
    evaluate,
    new_state,
    train_steps,
)

__all__ = [
    "FAMILIES",
    "get_family",
    "load_dictionary",
    "PRESETS",
    "SAETrainConfig",
    "apply_preset",
    "parse_dict_sizes",
    "parse_l1_list",
    "load_saes",
    "read_history",
    "read_summary",
    "save_grid",
    "SAE",
    "ActivationSource",
    "Callback",
    "GridState",
    "NonFiniteLoss",
    "evaluate",
    "new_state",
    "train_steps",
]
