"""The families: one registry of every dictionary method ``--arch`` names, trained or fitted.

A trained family (an SAE architecture) is what the trainer needs to train it as a one-pass grid:
- its stacked group (``StackedGroup`` subclass: S dictionaries of one size, one per value of
  the sparsity knob), and where a hand-written fast path exists, the autograd group it is
  tested against;
- the name of its sparsity knob, the ``SAETrainConfig`` field holding the knob's values and
  its CLI flag;
- the dictionary class its trained dictionaries are saved and loaded as;
- where its definition comes from (paper and a peer's code).

Adding an architecture is one module here: a ``StackedGroup`` subclass (its forward pass and
its loss), an ``AffineSAE`` subclass (its encode), and a ``register(Family(...))``.

A fitted family (a baseline the research compares SAEs with: the neuron basis, PCA, ICA, sparse
coding, random directions) has no group: its ``fit(data, config, n)`` builds the dictionaries of
one size, one per knob value, from the training rows (``fitted.FitData``), and
``check_sizes(d, sizes)`` refuses sizes the method cannot have (PCA and ICA: at most d
directions) before any work. Its dictionaries save, load and score like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    sparsity_name: str  # how rows, folders and messages name the knob: "l1", "k", "l0_coef"
    sparsity_field: str  # the SAETrainConfig field that holds the knob's values
    flag: str  # the CLI flag that sets them
    group: type | None  # what the trainer trains: the fast path where one is registered
    reference: type | None  # the autograd group; ``group`` is tested against it
    dictionary: type  # the class a trained dictionary is saved and loaded as
    denser_with_larger_knob: bool  # k: a larger value gives more active latents; L1: fewer
    source: str  # where the definition comes from
    # Fitted methods only: fit(data, config, n) -> {knob value: dictionary}, and the sizes check.
    fit: Callable | None = None
    check_sizes: Callable[[int, list[int]], None] | None = None
    # The knob values a command uses when none is given, where the command's own defaults
    # (another method's scale) would not fit: sparse coding's penalty.
    default_values: tuple | None = None

    @property
    def fitted(self) -> bool:
        """Fitted from the training rows (a baseline), not trained by SGD."""
        return self.fit is not None

    @property
    def knob_label(self) -> str:
        """The knob as messages and figures write it."""
        return {"l1": "L1", "l0_coef": "L0 coefficient"}.get(self.sparsity_name, self.sparsity_name)

    def values(self, config) -> list:
        return list(getattr(config, self.sparsity_field))


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


# Each module registers its family (and its dictionary class) on import.
from unsuperpose.train.families import (  # noqa: E402
    basis,
    batchtopk,
    jumprelu,
    matryoshka,
    relu,
    sparse_coding,
    topk,
)


def trained_families() -> list[Family]:
    return [f for f in FAMILIES.values() if not f.fitted]


def fitted_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.fitted]


__all__ = ["FAMILIES", "Family", "batchtopk", "get_family", "jumprelu", "matryoshka", "register"]
__all__ += ["basis", "fitted_families", "relu", "sparse_coding", "topk", "trained_families"]
