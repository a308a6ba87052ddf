"""The architectures' registry: one record (``Family``) per dictionary method ``--arch`` names.

Everything the package needs to know about an architecture is in its record: its sparsity knob
(``Knob``: name, type, flag, default values, how a value is parsed and written), the options it
reads, whether it is trained or fitted, the class its dictionaries are saved and loaded as, its
SAELens mapping (or why it has none), and the groups that train it. Nothing else in the package
names an architecture: the config, the command line, the loader, the export and the analysis ask
here.

This module is a leaf: it imports no family. Each family's module registers its record when it
is imported (the package ``unsuperpose.train`` imports the built-in ones), and a fast path
registers itself on top of its family (``register_fast_path``), so no import ever cycles back
through the registry. An architecture defined outside the package registers the same way:
``register(Family(...))`` before a config names it (tests/test_new_architecture.py does so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    """A sparsity knob: a grid trains one dictionary per value (and size).

    ``name`` keys it in summary rows, folder names and history ("l1", "k"); ``label`` is how
    messages and figures write it ("L1"); ``flag`` sets its values on the command line (several
    architectures may share a knob, and so its flag). ``minimum`` is the smallest value a grid
    may hold, except ``all_value``: a value the command line and folder names write "all" (a
    basis's k 0 keeps every coefficient), swept by default beside the command's own values.
    ``field``: the SAETrainConfig field older train_config.json files kept the values in (they
    had one list per knob; ``SAETrainConfig.upgrade_saved`` reads them).
    """

    name: str
    type: type  # float or int: every value is converted to it
    flag: str
    label: str
    defaults: tuple  # the values a grid holds when none are given
    denser_when_larger: bool  # k: a larger value gives more active latents; a penalty: fewer
    help: str = ""
    minimum: float = 0
    all_value: int | float | None = None
    field: str | None = None
    example: str = "1e-3,3e-3"

    def text(self, value) -> str:
        """A value as names and messages write it: ``all_value`` is "all", else ``{:g}``."""
        return "all" if self.all_value is not None and value == self.all_value else f"{value:g}"

    def parse(self, text: str) -> list:
        """'1e-3,3e-3' -> [0.001, 0.003] (or 'all'); a clear error for anything else."""
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        kind = "whole numbers" if self.type is int else "numbers"
        also = " or 'all'" if self.all_value is not None else ""
        try:
            values = [
                self.all_value if p == "all" and self.all_value is not None else self.type(p)
                for p in parts
            ]
        except ValueError:
            raise ValueError(
                f"cannot parse {self.label} list {text!r} ({self.flag}): expected {kind}{also} "
                f"separated by commas, e.g. {self.example}"
            ) from None
        if not values or self.problems(values):
            raise ValueError(
                f"{self.label} list {text!r} ({self.flag}) must hold {kind} >= "
                f"{self.minimum:g}{also}, e.g. {self.example}"
            )
        return values

    def problems(self, values: list) -> list[str]:
        """What is wrong with ``values`` as a grid's knob values ([] when nothing is)."""
        out = []
        if not values or any(not (v >= self.minimum or v == self.all_value) for v in values):
            also = f" (or {self.all_value})" if self.all_value is not None else ""
            out.append(
                f"{self.label} values must be a non-empty list of numbers >= {self.minimum:g}"
                f"{also} (got {values})"
            )
        if len(set(values)) != len(values):
            out.append(f"{self.label} values repeat: {values}")
        return out

    def convert(self, values) -> list:
        """``values`` as this knob's type (an int knob refuses 2.5 rather than rounding it)."""
        out = []
        for v in values:
            t = self.type(v)
            if t != v:
                raise ValueError(f"{self.label} value {v!r} is not of type {self.type.__name__}")
            out.append(t)
        return out


@dataclass(frozen=True)
class SAELens:
    """How an architecture's dictionaries are written in SAELens's format (``train.saelens``).

    ``architecture``: the SAELens inference architecture that computes what ours does
    ("standard", "topk" or "jumprelu"); ``training_architecture``: what SAELens calls the
    training architecture when it saves as another one (BatchTopK saves as JumpReLU);
    ``topk_while_unset``: written as "topk" while its threshold was never estimated (-1).
    """

    architecture: str
    training_architecture: str | None = None
    topk_while_unset: bool = False


@dataclass(frozen=True)
class Family:
    """One dictionary method: an SAE architecture (trained) or a baseline (fitted).

    A trained family gives ``group``: a ``StackedGroup`` subclass (S dictionaries of one size,
    one per knob value, trained by autograd). Where a hand-written step exists, its module calls
    ``register_fast_path``: ``group`` becomes it and ``reference`` the autograd group it is
    tested against. A fitted family gives ``fit(data, config, n)`` -> {knob value: dictionary}
    and may give ``check_sizes(d, sizes)``, which refuses sizes the method cannot have.
    """

    name: str  # what --arch, summary rows, folder names and the dictionaries' tag call it
    knob: Knob
    dictionary: type  # the class its dictionaries are saved and loaded as (tag ``name``)
    source: str  # where the definition comes from (paper and a peer's code)
    group: type | None = None
    reference: type | None = None
    fit: Callable | None = None
    check_sizes: Callable[[int, list[int]], None] | None = None
    # SAETrainConfig's option groups this family reads (their dataclasses: AuxKOptions, ...);
    # another family's do not change what its run computes.
    options: tuple[type, ...] = ()
    # SAETrainConfig's top-level settings no other family reads (relu: tied, l1_norm); another
    # family refuses them set away from their defaults.
    settings: tuple[str, ...] = ()
    # The knob values a command uses when none is given, where the command's own defaults for
    # this knob (another method's scale) would not fit; None: the command's.
    default_values: tuple | None = None
    saelens: SAELens | None = None
    saelens_refusal: str = "SAELens has no architecture that computes its codes"

    def __post_init__(self) -> None:
        if (self.group is None) == (self.fit is None):
            raise ValueError(
                f"family {self.name!r} needs exactly one of group (trained) or fit (fitted)"
            )
        if getattr(self.dictionary, "arch", None) != self.name:
            raise ValueError(
                f"family {self.name!r}: its dictionary class {self.dictionary.__name__} must "
                f"carry the tag arch = {self.name!r} (load_dictionary reads it back by the tag)"
            )

    @property
    def fitted(self) -> bool:
        """Fitted from the training rows (a baseline), not trained by SGD."""
        return self.fit is not None

    @property
    def defaults(self) -> tuple:
        """The knob values a grid of this family holds when none are given."""
        return self.knob.defaults if self.default_values is None else self.default_values


FAMILIES: dict[str, Family] = {}
# The architecture every run had before there were others: what a saved dictionary or config
# without an ``arch`` tag holds, what --arch defaults to, and the one whose set folders and
# reports carry no architecture suffix (``train.layout``), as they always have.
DEFAULT_ARCH = "relu"


def register(family: Family, *, replace: bool = False) -> Family:
    """Make ``family`` known to --arch, the config, the loader and the analysis. A second
    family under a taken name is refused unless ``replace``."""
    have = FAMILIES.get(family.name)
    if have is not None and have != family and not replace:
        raise ValueError(f"an architecture named {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Forget an architecture (a test's, once it is done)."""
    FAMILIES.pop(name, None)


def register_fast_path(name: str, group: type) -> type:
    """``group`` trains family ``name`` from now on; its autograd group stays the reference the
    fast one is tested against. The fast path's module calls this, after importing its family."""
    family = get_family(name)
    reference = family.reference or family.group
    FAMILIES[name] = dataclasses.replace(family, group=group, reference=reference)
    return group


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_names() -> list[str]:
    return list(FAMILIES)


def trained_families() -> list[Family]:
    return [f for f in FAMILIES.values() if not f.fitted]


def fitted_families() -> list[Family]:
    return [f for f in FAMILIES.values() if f.fitted]


def knobs() -> dict[str, Knob]:
    """Every registered knob by its flag (architectures sharing a knob share its flag)."""
    return {f.knob.flag: f.knob for f in FAMILIES.values()}
