"""Sparse autoencoders and the grid trainer. Knows activation sources, never toy data or LMs.

Importing it registers the built-in architectures (``train.families``); ``register`` adds one
defined elsewhere: a ``Family`` record (``train.registry``) naming its ``Knob``, its
``StackedGroup`` subclass and its dictionary class (an ``AffineSAE`` or ``StoredDictionary``
subclass). tests/test_new_architecture.py defines one in the test file alone.
"""

from unsuperpose.train import families as _builtin  # noqa: F401  (registers them)
from unsuperpose.train.config import (
    PRESETS,
    SAETrainConfig,
    apply_preset,
    parse_dict_sizes,
    parse_l1_list,
)
from unsuperpose.train.dictionary import AffineSAE, StoredDictionary, load_dictionary
from unsuperpose.train.families.stacked import StackedGroup
from unsuperpose.train.grid import GridError, run_grid
from unsuperpose.train.io import load_saes, read_history, read_summary, save_grid
from unsuperpose.train.registry import (
    FAMILIES,
    Family,
    Knob,
    SAELens,
    get_family,
    register,
    register_fast_path,
    unregister,
)
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
    "AffineSAE",
    "StackedGroup",
    "StoredDictionary",
    "FAMILIES",
    "Family",
    "Knob",
    "SAELens",
    "get_family",
    "register",
    "register_fast_path",
    "unregister",
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
    "GridError",
    "run_grid",
    "SAE",
    "ActivationSource",
    "Callback",
    "GridState",
    "NonFiniteLoss",
    "evaluate",
    "new_state",
    "train_steps",
]
