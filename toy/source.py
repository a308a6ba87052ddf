"""ToySource: the synthetic data as an activation source, with its ground truth attached."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from unsuperpose.distributed import with_index
from unsuperpose.hashing import json_sha256
from unsuperpose.seeding import seeded_generator
from unsuperpose.toy.config import ToyConfig
from unsuperpose.toy.hierarchy import build_forest
from unsuperpose.toy.sampling import (
    dead_window_for,
    feature_probabilities,
    lowrank_factor,
    random_groups,
    sample_codes,
    unit_features,
    zipf_probabilities,
)

# Separate random streams so that training batches, evaluation samples and the fixed
# structure (features, covariance) never share draws.
_STREAM_STRUCTURE, _STREAM_BATCHES, _STREAM_SAMPLE, _STREAM_HELDOUT = 0, 1, 2, 3


class ToySource:
    """Toy activations x = codes @ features (+ noise) with known ``features`` (G x h, unit rows).

    Satisfies the activation-source interface of ``unsuperpose.train``: ``d`` and
    ``batches(batch_size, seed=, start=)``. Batch ``i`` of a stream is generated from its own
    seed (config seed, stream seed, i), so a stream can restart at any batch in O(1) — that is
    what lets a training run resume exactly.

    ``probs`` are the features' true firing probabilities: with ``hierarchy``, a child's is its
    parent's times its conditional one (``toy.hierarchy``), not the ``frequencies`` target;
    ``forest`` is then the trees (else None), and ``lowrank`` the low-rank correlation's factor
    and private standard deviations (else None).

    ``device``: where the data is used. Batches are drawn with the generator of ``rng_device``
    (default: ``device``) and yielded there; the trainer moves them. The ground truth (features,
    probabilities, groups, trees, factor) is always drawn on the CPU, so it is the same on every
    device; a GPU's batches are not the CPU's (another generator), which ``describe`` records as
    part of the data's identity. ``rng_device="cpu"`` draws the CPU's very batches for a GPU
    run, to compare it with a CPU run of the same seed.
    """

    def __init__(
        self,
        config: ToyConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        rng_device: torch.device | str | None = None,
    ):
        self.config = config or ToyConfig()
        c = self.config
        gen = seeded_generator(c.seed, _STREAM_STRUCTURE)
        self.features = unit_features(c.G, c.h, gen)
        self.probs = (
            zipf_probabilities(c.G, c.zipf_exponent, c.p_max, c.p_min)
            if c.frequencies == "zipf"
            else feature_probabilities(c.G, c.k, c.decay)
        )
        self.forest = None
        if c.hierarchy:
            self.forest, self.probs = build_forest(
                c.G, c.hierarchy_roots, c.hierarchy_branching, c.hierarchy_depth, self.probs
            )
        # the copula draws every feature but the children
        drawn = self.probs if self.forest is None else self.probs[self.forest.parent < 0]
        correlated = c.correlation_structure == "lowrank" or c.correlation > 0
        if c.correlation_recipe == "report" and correlated and float(drawn.max()) > 0.5:
            raise ValueError(
                f"the report's correlation recipe keeps the mean number active at k only while "
                f"every feature's probability is at most 1/2 (the commonest is "
                f"{float(drawn.max()):.2f} at k {c.k}, decay {c.decay}): lower k, raise the "
                "decay towards 1, or use correlation_recipe='threshold'"
            )
        self.groups = random_groups(c.G, c.group_size, gen)
        self.lowrank = (
            lowrank_factor(c.G, c.lowrank_rank, c.lowrank_scale, gen)
            if c.correlation_structure == "lowrank"
            else None
        )
        self.device = with_index(device)
        self.rng_device = with_index(rng_device) if rng_device is not None else self.device
        self._n_groups = int(self.groups.max()) + 1
        on = self.rng_device
        self._features, self._probs, self._groups = (
            t.to(on) for t in (self.features, self.probs, self.groups)
        )
        self._forest = self.forest.to(on) if self.forest is not None else None
        self._lowrank = None if self.lowrank is None else tuple(t.to(on) for t in self.lowrank)

    @property
    def d(self) -> int:
        return self.config.h

    def _make(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """On the generator's device: drawn on the CPU for a GPU run, the trainer copies them
        over asynchronously through pinned memory (a plain ``.to`` here would wait for it)."""
        codes = sample_codes(
            n,
            self._probs,
            self._groups,
            self.config.correlation,
            gen,
            self._n_groups,
            self.config.correlation_recipe,
            lowrank=self._lowrank,
            forest=self._forest,
        )
        x = codes @ self._features
        if self.config.noise > 0:
            x += self.config.noise * torch.randn(x.shape, generator=gen, device=gen.device)
        return x, codes

    def dead_window(self, batch_size: int) -> int:
        """The dead window these data call for (``dead_window_for``): long enough that a latent
        which learnt the rarest feature is not counted dead by chance."""
        return dead_window_for(self.probs, batch_size)

    def _gen(self, *key: int) -> torch.Generator:
        return seeded_generator(self.config.seed, *key, device=self.rng_device)

    def sample(self, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh samples (x: n x h, codes: n x G) from a stream apart from training's."""
        x, codes = self._make(n, self._gen(_STREAM_SAMPLE, seed))
        return x.to(self.device), codes.to(self.device)

    def batches(self, batch_size: int, *, seed: int = 0, start: int = 0) -> Iterator[torch.Tensor]:
        """Endless float32 (batch_size, h) batches; ``start`` skips that many at no cost."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        i = start
        while True:
            yield self._make(batch_size, self._gen(_STREAM_BATCHES, seed, i))[0]
            i += 1

    # -- held-out evaluation: a stream no training batch is ever drawn from -----------------------
    def heldout_rows(self, max_rows: int | None = None) -> int:
        if max_rows is None:
            raise ValueError("toy data has endless held-out samples: give max_rows")
        return max_rows

    def heldout_batches(
        self, batch_size: int, max_rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """``max_rows`` samples in batches of ``batch_size`` (the last may be shorter), the same
        every call, from their own stream (never a training batch, whatever its seed)."""
        total = self.heldout_rows(max_rows)
        for i, lo in enumerate(range(0, total, batch_size)):
            n = min(batch_size, total - lo)
            yield self._make(n, self._gen(_STREAM_HELDOUT, i))[0]

    heldout_description = "fresh samples from a generator stream training never draws from"

    def describe(self) -> dict:
        """What the data is; ``fingerprint`` identifies it for resuming and merging runs."""
        info = {"kind": "toy", **vars(self.config)}
        if info["correlation_recipe"] == "threshold":  # the original recipe: fingerprints unchanged
            del info["correlation_recipe"]
        zipf = ("zipf_exponent", "p_max", "p_min")
        # the report's frequencies: fingerprints unchanged; Zipfian ones: k and decay are unused
        for name in ("frequencies", *zipf) if info["frequencies"] == "decay" else ("k", "decay"):
            del info[name]
        # no trees and the block copula: fingerprints unchanged; else what those leave unused
        if not info["hierarchy"]:
            for name in ("hierarchy", "hierarchy_roots", "hierarchy_branching", "hierarchy_depth"):
                del info[name]
        lowrank = ("correlation_structure", "lowrank_rank", "lowrank_scale")
        blocks = ("correlation", "group_size")
        for name in lowrank if info["correlation_structure"] == "blocks" else blocks:
            del info[name]
        if self.rng_device.type == "cuda":  # another generator, other batches (CPU runs: unchanged)
            # CUDA's random streams depend on the GPU's multiprocessor count, so name the model.
            props = torch.cuda.get_device_properties(self.rng_device)
            info["rng"] = f"cuda:{props.name}:{props.multi_processor_count}SM"
        return {**info, "fingerprint": json_sha256(info)}
