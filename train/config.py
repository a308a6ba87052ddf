"""What a grid of SAEs is trained with: one dataclass, saved as JSON beside the dictionaries.

It names no architecture: ``arch`` is a registered family (``train.registry``), ``sparsity``
holds that family's knob values in its knob's type, and the option groups (AuxK, BatchTopK, ...)
are fields here so that each is a group of flags and a block of the JSON; which family reads
which group, and which top-level settings are one family's own, its record says.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Literal

from unsuperpose.config import field
from unsuperpose.train.knobs import L1
from unsuperpose.train.registry import DEFAULT_ARCH, FAMILIES, Family, family_names, get_family

L1Norm = Literal["sum", "per_latent"]
# The fields configs had before the knob was one list (one per knob); ``upgrade_saved`` reads
# the architecture's own from older train_config.json files and checkpoints.
OLD_KNOB_FIELDS = ("l1", "top_k", "l0_coef")
# What only SGD training reads: a fitted baseline's result does not depend on these.
SGD_ONLY = {
    "lr",
    "beta1",
    "beta2",
    "resample_every",
    "resample_until",
    "resample_pool",
    "decoder_init",
    "encoder_init",
    "sparse_below",
    "dead_window",
    "log_every",
    "tf32",
    "tied",
    "l1_norm",
}


@dataclass
class AuxKOptions:
    """AuxK (Gao et al. 2024): latents dead for a while learn to reconstruct what the live
    ones miss (topk, batchtopk, matryoshka)."""

    coef: float = field(
        1 / 32, help="weight of the AuxK loss (Gao et al. 2024: 1/32); 0 turns AuxK off"
    )
    k_aux: int = field(0, help="dead latents each row may use (0: d_in // 2, as sparsify)")
    dead_tokens: int = field(
        0,
        help="rows without firing after which a latent counts as dead for AuxK "
        "(0: the run's dead_window x batch_size, the diagnostic's own window)",
    )


@dataclass
class BatchTopKOptions:
    """BatchTopK's inference threshold (Bussmann et al. 2024)."""

    threshold_momentum: float = field(
        0.999,
        help="the inference threshold is an exponential moving average, with this momentum, "
        "of the smallest code each training batch keeps (dictionary_learning's 0.999)",
    )
    threshold_from: float = field(
        0.2,
        help="fraction of training after which the threshold is averaged (the early "
        "codes say little about the final ones)",
    )


@dataclass
class JumpReLUOptions:
    """JumpReLU (Rajamanoharan et al. 2024): per-latent thresholds learnt through
    straight-through estimators."""

    bandwidth: float = field(
        1e-3, help="width of the rectangle kernel of the threshold's pseudo-derivative (paper)"
    )
    init_threshold: float = field(1e-3, help="every threshold's starting value (paper: 0.001)")


@dataclass
class MatryoshkaOptions:
    """Matryoshka SAEs (Bussmann et al. 2025; Nabeshima 2024): nested prefixes of the
    dictionary each reconstruct the input on their own."""

    prefixes: list[float] = field(
        default_factory=lambda: [0.0625, 0.125, 0.25, 0.5, 1.0],
        help="the nested prefixes, as fractions of the dictionary size (the last must be 1)",
    )


@dataclass
class ICAOptions:
    """FastICA (scikit-learn), the baseline of Cunningham et al. (2023)."""

    rows: int = field(
        65_536,
        help="training rows FastICA is fitted on (held in memory: the first rows of the run's "
        "batch stream, at most steps x batch_size)",
    )
    max_iter: int = field(500, help="FastICA's iteration limit")
    tol: float = field(1e-4, help="FastICA's convergence tolerance")


@dataclass
class SparseCodingOptions:
    """Sparse coding: a dictionary learnt by alternating FISTA inference with dictionary
    updates (train/families/sparse_coding.py)."""

    iters: int = field(100, help="FISTA iterations per inference, in fitting and in encoding")
    positive: bool = field(True, help="non-negative codes (like an SAE's); off: the signed lasso")
    forget: float = field(
        10.0,
        help="batch j of the pass weighs j**forget in the dictionary's statistics (0: a plain "
        "average; larger discounts the early batches, coded with a poorer dictionary)",
    )
    resample_rows: int = field(
        100_000,
        help="an atom with no non-zero code for this many training rows is replaced by a row "
        "of the current batch",
    )


@dataclass
class SAETrainConfig:
    """Training settings shared by every SAE of a grid (sparsity values x dictionary sizes)."""

    arch: str = field(
        DEFAULT_ARCH,
        help="the dictionary method: an SAE architecture, relu (the report's ReLU + L1), "
        "topk, batchtopk, jumprelu or matryoshka; or a fitted baseline, neurons, pca, ica, "
        "random or sparse-coding (and any architecture registered with train.register)",
        choices=family_names,
    )
    sparsity: list | None = field(
        None,
        help="the values of the architecture's sparsity knob (relu's L1 coefficients, topk's "
        "k, ...), one dictionary per value and size, of the knob's type; None: its defaults",
    )
    dict_sizes: list[int] = field(default_factory=lambda: [512], help="dictionary sizes (latents)")
    l1_norm: L1Norm = field(
        "sum",
        help="L1 convention: 'sum' = alpha * mean_batch(sum_i |c_i|) "
        "(the standard); 'per_latent' = the same divided by the dictionary size "
        "(the 2022 report's convention)",
    )
    tied: bool = field(
        False, help="tie the encoder to the decoder's transpose (Cunningham et al. 2023)"
    )
    decoder_init: Literal["orthogonal", "data"] = field(
        "orthogonal",
        help="decoder init: orthogonal (the report) or normalised data samples (the update)",
    )
    encoder_init: Literal["transpose", "kaiming"] = field(
        "transpose",
        help="encoder init: the decoder's transpose, or uniform +-1/sqrt(d) like nn.Linear "
        "(the report); ignored when tied",
    )
    lr: float = field(
        3e-3,
        help="Adam learning rate (the report: 1e-3; 3e-3 recovers toy features faster, see README)",
    )
    beta1: float = field(0.9, help="Adam beta1")
    beta2: float = field(0.999, help="Adam beta2")
    batch_size: int = field(256, help="activations per step")
    steps: int = field(5000, help="optimizer steps")
    dead_window: int = field(
        1000, help="a latent is dead if it has not fired in this many minibatches"
    )
    resample_every: int = field(
        0,
        help="steps between resampling dead latents onto poorly "
        "reconstructed inputs (0: never, the default: resampling revives "
        "the very latents whose death the dead-neuron diagnostic reads; "
        "not in the report)",
    )
    resample_pool: int = field(
        16,
        help="batches drawn (from a stream of their own) to pick "
        "resampling targets from, so many dead latents get distinct inputs",
    )
    resample_until: float = field(
        0.7,
        help="fraction of training after which no more resampling "
        "happens, so the final dictionary can settle",
    )
    sparse_below: float = field(
        0.02,
        help="use the sparse backward in a step where fewer than this "
        "fraction of codes are active (0: always dense); same results",
    )
    seed: int = field(
        0, help="seed of the initialisation (one per dictionary size; shared across L1)"
    )
    data_seed: int = field(0, help="seed of the batch stream drawn from the source")
    log_every: int = field(100, help="steps between logged training scalars")
    tf32: bool = field(
        False,
        help="let float32 matmuls on an NVIDIA GPU use TF32 (faster; "
        "products keep ~10 mantissa bits); off by default so a GPU run matches the "
        "CPU run of the same seed to float32 tolerance; no effect on the CPU",
    )
    eval_rows: int = field(
        65_536,
        help="held-out rows for the final metrics (at most the "
        "source's held-out rows: all of them for a store holding fewer)",
    )

    auxk: AuxKOptions = field(default_factory=AuxKOptions, help="AuxK")
    batchtopk: BatchTopKOptions = field(default_factory=BatchTopKOptions, help="BatchTopK")
    jumprelu: JumpReLUOptions = field(default_factory=JumpReLUOptions, help="JumpReLU")
    matryoshka: MatryoshkaOptions = field(default_factory=MatryoshkaOptions, help="Matryoshka")
    ica: ICAOptions = field(default_factory=ICAOptions, help="ICA")
    sparse_coding: SparseCodingOptions = field(
        default_factory=SparseCodingOptions, help="sparse coding"
    )

    @property
    def family(self) -> Family:
        """The architecture's record (``train.registry``): its knob, options, groups."""
        return get_family(self.arch)

    @property
    def fitted(self) -> bool:
        """A baseline fitted from the training rows, not an SAE trained by SGD."""
        return self.family.fitted

    @classmethod
    def upgrade_saved(cls, data: dict) -> dict:
        """A saved config as this version takes it: older ones kept the knob's values in one
        field per knob (l1, top_k, l0_coef); the architecture's own becomes ``sparsity``."""
        old = {k: data.pop(k) for k in OLD_KNOB_FIELDS if k in data}
        if "sparsity" not in data and old:
            field_name = get_family(data.get("arch", DEFAULT_ARCH)).knob.field
            if field_name in old:
                data["sparsity"] = old[field_name]
        return data

    def __post_init__(self) -> None:
        family = get_family(self.arch)  # ValueError naming the known ones
        knob = family.knob
        problems = []
        values = list(family.defaults if self.sparsity is None else self.sparsity)
        try:
            self.sparsity = knob.convert(values)
        except (TypeError, ValueError) as exc:  # e.g. another architecture's values kept
            raise ValueError(
                f"{self.arch}: {exc} (sparsity holds the values of its knob, {knob.label})"
            ) from None
        self.dict_sizes = [int(v) for v in self.dict_sizes]
        problems += knob.problems(self.sparsity)
        sc = self.sparse_coding
        if min(self.ica.rows, self.ica.max_iter, sc.iters, sc.resample_rows) < 1 or sc.forget < 0:
            problems.append(
                "ica.rows, ica.max_iter, sparse_coding.iters and sparse_coding.resample_rows "
                "must be >= 1, sparse_coding.forget >= 0"
            )
        problems += _refused_settings(self)
        prefixes = self.matryoshka.prefixes
        if (
            not prefixes
            or sorted(prefixes) != list(prefixes)
            or prefixes[-1] != 1
            or prefixes[0] <= 0
        ):
            problems.append(
                f"matryoshka prefixes must increase, be > 0 and end at 1 (got {prefixes})"
            )
        if not self.dict_sizes or any(n < 1 for n in self.dict_sizes):
            problems.append(f"dictionary sizes must be positive integers (got {self.dict_sizes})")
        if len(set(self.dict_sizes)) != len(self.dict_sizes):
            problems.append(f"dictionary sizes repeat: {self.dict_sizes}")
        for name in (
            "batch_size",
            "steps",
            "dead_window",
            "log_every",
            "eval_rows",
            "resample_pool",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.sparse_below <= 1:
            problems.append(f"sparse_below must be in [0, 1] (got {self.sparse_below})")
        if self.resample_every < 0 or not 0 <= self.resample_until <= 1:
            problems.append("resample_every must be >= 0 and resample_until in [0, 1]")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if problems:
            raise ValueError("; ".join(problems))


# Settings that choose how a step is computed, never what it computes ("same results"): another
# architecture ignores them rather than refusing them.
HOW_ONLY = {"sparse_below"}


def _settings_of_others(family: Family) -> set[str]:
    """Top-level settings other families declare as their own (relu's tied, l1_norm)."""
    return {s for f in FAMILIES.values() for s in f.settings} - set(family.settings)


def _refused_settings(config: SAETrainConfig) -> list[str]:
    """Another family's own settings set away from their defaults: refused, not ignored."""
    problems = []
    defaults = SAETrainConfig.__dataclass_fields__
    for name in sorted(_settings_of_others(config.family) - HOW_ONLY):
        if getattr(config, name) != defaults[name].default:
            owners = " and ".join(f.name for f in FAMILIES.values() if name in f.settings)
            problems.append(f"{name} is a setting of {owners}, not of {config.arch}")
    return problems


def irrelevant_fields(config: SAETrainConfig) -> set[str]:
    """Fields that cannot change what a run of ``config.arch`` computes: the option groups
    its family does not read, the other families' own settings (``__post_init__`` keeps most at
    their defaults anyway), and for a fitted baseline what only SGD reads."""
    family = config.family
    fields = _option_fields()
    mine = {fields[o] for o in family.options}
    groups = set(fields.values()) - mine
    sgd_only = SGD_ONLY if family.fitted else set()
    return groups | _settings_of_others(family) | sgd_only


def option_groups(arch: str) -> tuple[str, ...]:
    """The SAETrainConfig fields holding the options ``arch``'s family reads ("auxk", ...);
    none for an architecture this version does not know."""
    family = FAMILIES.get(arch)
    fields = _option_fields()
    return tuple(fields[o] for o in family.options) if family else ()


def _option_fields() -> dict[type, str]:
    """Each option dataclass -> the SAETrainConfig field holding it (``auxk``, ...)."""
    hints = typing.get_type_hints(SAETrainConfig)
    return {
        hints[f.name]: f.name
        for f in dataclasses.fields(SAETrainConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


PRESETS: dict[str, dict] = {
    # Sharkey et al. 2022 as described: Adam 1e-3, batch 256, L1 divided by the dictionary size,
    # orthogonal decoder, nn.Linear-style encoder.
    "report": dict(
        lr=1e-3,
        batch_size=256,
        l1_norm="per_latent",
        decoder_init="orthogonal",
        encoder_init="kaiming",
        tied=False,
        resample_every=0,
    ),
}


def apply_preset(config: SAETrainConfig, preset: str | None) -> SAETrainConfig:
    if preset is None:
        return config
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(config, **PRESETS[preset])


def parse_l1_list(text: str) -> list[float]:
    """'1e-3,3e-3' -> [0.001, 0.003]; a clear error for anything that is not a list of numbers."""
    return L1.parse(text)


_SIZE = re.compile(r"^(?:(\d+(?:\.\d+)?|\d+/\d+)x|(\d+(?:\.\d+)?|\d+/\d+))$")


def parse_dict_sizes(text: str, base: int, *, bare: str = "absolute") -> list[tuple[str, int]]:
    """'1/8x,1x,8x,4096' -> [(label, size)], ratios relative to ``base``.

    The base is G for toy data (as in the report) and the activation width d for an LM store.
    ``bare``: what a number without 'x' means, 'absolute' (latents) or 'ratio' (for a flag named
    --dict-ratios, where '1' meaning one latent would be a trap).
    """
    if bare not in ("absolute", "ratio"):
        raise ValueError(f"bare must be 'absolute' or 'ratio', not {bare!r}")
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = _SIZE.match(part)
        if not m:
            raise ValueError(
                f"cannot parse dictionary size {part!r} in {text!r}: use a ratio like "
                "8x, 0.5x or 1/8x, or an absolute number of latents like 4096"
            )
        if m.group(2) and bare == "absolute":
            if not m.group(2).isdigit():
                raise ValueError(
                    f"dictionary size {part!r}: an absolute size is a whole number of "
                    f"latents; for a ratio write {part}x"
                )
            size = int(m.group(2))
        else:
            ratio_text = m.group(1) or m.group(2)
            num, _, den = ratio_text.partition("/")
            if den and float(den) == 0:
                raise ValueError(f"dictionary size {part!r} divides by zero")
            ratio = float(num) / float(den) if den else float(num)
            size = round(ratio * base)
        if size < 1:
            raise ValueError(
                f"dictionary size {part!r} gives {size} latents (base {base}); it must "
                "give at least 1"
            )
        out.append((part, size))
    sizes = [s for _, s in out]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"dictionary sizes {text!r} repeat a size ({sizes})")
    return out
