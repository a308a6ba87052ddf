"""The linear baselines: the neuron basis, PCA, ICA and random directions, fitted not trained.

Cunningham et al. (2023) compare SAE directions with the neuron basis, PCA and ICA; random
directions are the floor. Each is a ``LinearBasis``:

    c     = (x - mean) @ encoder                (d -> n coefficients)
    codes = the k coefficients of largest |c| per row, the others 0 (k = 0, `--topk all`: all)
    x_hat = codes @ W_dec + mean

- ``neurons``: encoder = W_dec = identity, mean 0; the codes are the activations. Size d only.
- ``pca``: the top-n eigenvectors of the training covariance (``FitData.moments``), centred on
  the training mean; encoder = W_dec^T. At most d directions.
- ``ica``: scikit-learn's FastICA (``whiten="unit-variance"``) on the first ``ica.rows`` training
  rows: encoder = the unmixing matrix's transpose, W_dec = the mixing matrix's transpose. The
  atoms are the mixing matrix's columns (what a source adds to x), not the unmixing rows. At
  most d components.
- ``random``: n directions uniform on the sphere (seeded by the run's seed and n), the training
  mean as centre, and the least-squares encoder (the pseudo-inverse of W_dec). Any size.

L0 is defined as for every dictionary: the mean number of non-zero codes per row. A dense basis
(k = all) has L0 = n; the knob k sets it, so a baseline sits on the L0 axis beside the SAEs.
Codes are signed; L1 counts |codes|.

Sign: a PCA, ICA or random direction has none, while MMCS, MCC and the browser read signed
atoms. Each direction is oriented so that its coefficient's third central moment on the
training rows is positive: a feature that is off most of the time and sometimes strongly on
(the picture of a sparse feature) then points along +atom, as an SAE's does. The neuron basis
keeps the neurons' own sign. Scores are therefore plain (signed) cosines for every method.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from unsuperpose.seeding import seeded_generator
from unsuperpose.train.config import ICAOptions, SAETrainConfig
from unsuperpose.train.dictionary import StoredDictionary
from unsuperpose.train.knobs import K_OR_ALL, TOPK_ALL
from unsuperpose.train.registry import Family, register

_RANDOM_STREAM = 7_001  # the random basis's key beside the run's seed and the size


def keep_largest(c: torch.Tensor, k: int) -> torch.Tensor:
    """``c`` with all but the ``k`` entries of largest magnitude per row set to 0 (k 0: all)."""
    if k == TOPK_ALL or k >= c.shape[-1]:
        return c
    idx = c.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(c).scatter(-1, idx, c.gather(-1, idx))


class LinearBasis(StoredDictionary):
    """A fixed linear basis with top-|k| codes; subclasses only name their method (``arch``)."""

    arch: ClassVar[str]

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict):
        super().__init__()
        self.d_in, self.d_sae = tensors["encoder"].shape
        for name in ("encoder", "W_dec", "mean"):
            self.register_buffer(name, tensors[name].detach().float().clone())
        self.config = dict(config)
        self.k = int(self.config.get("k", TOPK_ALL))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return keep_largest((x - self.mean) @ self.encoder, self.k)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.mean

    def atoms(self) -> torch.Tensor:
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"encoder": self.encoder, "W_dec": self.W_dec, "mean": self.mean}

    def identity(self) -> dict:
        return {**super().identity(), "k": self.k}


class NeuronBasis(LinearBasis):
    arch = "neurons"


class PCABasis(LinearBasis):
    arch = "pca"


class ICABasis(LinearBasis):
    arch = "ica"


class RandomBasis(LinearBasis):
    arch = "random"


def orient(data, encoder: torch.Tensor, W_dec: torch.Tensor, mean: torch.Tensor):
    """Flip each direction so its coefficient's third central moment on the training rows is
    positive (see the module docstring); one pass over the fitting rows."""
    enc = encoder.double()
    first = torch.zeros(enc.shape[1], dtype=torch.float64, device=enc.device)
    second = torch.zeros_like(first)
    third = torch.zeros_like(first)
    rows = 0
    for x in data.stream():
        c = (x.double() - mean.double()) @ enc
        first += c.sum(0)
        second += c.pow(2).sum(0)
        third += c.pow(3).sum(0)
        rows += len(x)
    m1, m2, m3 = first / rows, second / rows, third / rows
    central3 = m3 - 3 * m1 * m2 + 2 * m1.pow(3)
    sign = torch.where(central3 < 0, -1.0, 1.0).to(encoder.dtype)
    return encoder * sign, W_dec * sign[:, None]


def _bases(cls, config: SAETrainConfig, tensors: dict, meta: dict) -> dict[int, LinearBasis]:
    """One dictionary per k of the grid, sharing the fitted tensors."""
    return {k: cls(tensors, {**meta, "k": k}) for k in config.sparsity}


def fit_neurons(data, config: SAETrainConfig, n: int) -> dict[int, LinearBasis]:
    eye = torch.eye(data.d, device=data.device)
    tensors = {"encoder": eye, "W_dec": eye, "mean": torch.zeros(data.d, device=data.device)}
    return _bases(NeuronBasis, config, tensors, {"fit_rows": 0, "oriented": "the neurons' own"})


def fit_pca(data, config: SAETrainConfig, n: int) -> dict[int, LinearBasis]:
    mean, cov = data.moments()
    values, vectors = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(values, descending=True)[:n]
    W_dec = vectors[:, order].T.float().contiguous()  # (n, d), orthonormal rows
    mean = mean.float()
    encoder, W_dec = orient(data, W_dec.T.contiguous(), W_dec, mean)
    meta = {
        "fit_rows": data.rows,
        "explained_variance": values[order].tolist(),
        "total_variance": float(values.sum()),
        "oriented": "positive third moment",
    }
    return _bases(PCABasis, config, {"encoder": encoder, "W_dec": W_dec, "mean": mean}, meta)


def fit_ica(data, config: SAETrainConfig, n: int) -> dict[int, LinearBasis]:
    import warnings

    from sklearn.decomposition import FastICA
    from sklearn.decomposition._fastica import _logcosh
    from sklearn.exceptions import ConvergenceWarning

    opts = config.ica
    x = data.sample(opts.rows)
    # FastICA has no callback, but its parallel algorithm calls `fun` once per iteration: sklearn's
    # own logcosh through a callable that counts, so the bar moves with the iterations (up to
    # max_iter; it stops short where the fit converges) and the fit is unchanged.
    bar = data.bar(total=opts.max_iter, desc=f"ica n={n}", unit="iter")

    def logcosh(v: np.ndarray, **fun_args):
        bar.update(1)
        return _logcosh(v, fun_args)

    ica = FastICA(
        n_components=n,
        whiten="unit-variance",
        fun=logcosh,
        max_iter=opts.max_iter,
        tol=opts.tol,
        random_state=int(np.random.SeedSequence([config.seed, n]).generate_state(1)[0]),
    )
    with warnings.catch_warnings(record=True) as caught, bar:
        warnings.simplefilter("always", ConvergenceWarning)
        ica.fit(x.double().cpu().numpy())
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    on = {"device": data.device, "dtype": torch.float32}
    encoder = torch.as_tensor(ica.components_.T.copy(), **on)  # (d, n): x -> sources
    W_dec = torch.as_tensor(ica.mixing_.T.copy(), **on)  # (n, d): sources -> x
    mean = torch.as_tensor(ica.mean_.copy(), **on)
    encoder, W_dec = orient(data, encoder, W_dec, mean)
    meta = {
        "fit_rows": len(x),
        "iterations": int(ica.n_iter_),
        "converged": converged,
        "oriented": "positive third moment",
    }
    return _bases(ICABasis, config, {"encoder": encoder, "W_dec": W_dec, "mean": mean}, meta)


def fit_random(data, config: SAETrainConfig, n: int) -> dict[int, LinearBasis]:
    gen = seeded_generator(config.seed, n, _RANDOM_STREAM)
    W_dec = torch.randn(n, data.d, generator=gen)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).to(data.device)
    encoder = torch.linalg.pinv(W_dec.double()).float()  # (d, n): least-squares codes
    mean = data.moments()[0].float()
    encoder, W_dec = orient(data, encoder, W_dec, mean)
    meta = {"fit_rows": data.rows, "oriented": "positive third moment"}
    return _bases(RandomBasis, config, {"encoder": encoder, "W_dec": W_dec, "mean": mean}, meta)


def _exactly_d(method: str):
    def check(d: int, sizes: list[int]) -> None:
        if sizes != [d]:
            raise ValueError(
                f"the {method} basis has exactly d = {d} directions; dict_sizes asks {sizes}"
            )

    return check


def _at_most_d(method: str):
    def check(d: int, sizes: list[int]) -> None:
        if max(sizes) > d:
            raise ValueError(
                f"{method} has at most d = {d} directions; dict_sizes asks {max(sizes)} "
                f"(sizes {sizes})"
            )

    return check


_COMMON = dict(
    knob=K_OR_ALL,
    saelens_refusal="a fitted basis is not an SAE (SAELens loads SAEs: an encoder, a "
    "nonlinearity and a decoder)",
)

register(
    Family(
        name="neurons",
        dictionary=NeuronBasis,
        source="the neuron basis, Cunningham et al. 2023's first baseline",
        fit=fit_neurons,
        check_sizes=_exactly_d("neuron"),
        **_COMMON,
    )
)
register(
    Family(
        name="pca",
        dictionary=PCABasis,
        source="principal components of the training rows (Cunningham et al. 2023)",
        fit=fit_pca,
        check_sizes=_at_most_d("PCA"),
        **_COMMON,
    )
)
register(
    Family(
        name="ica",
        dictionary=ICABasis,
        source="FastICA, Hyvarinen 1999, scikit-learn's (Cunningham et al. 2023)",
        fit=fit_ica,
        check_sizes=_at_most_d("ICA"),
        options=(ICAOptions,),
        **_COMMON,
    )
)
register(
    Family(
        name="random",
        dictionary=RandomBasis,
        source="random unit directions, a floor",
        fit=fit_random,
        **_COMMON,
    )
)
